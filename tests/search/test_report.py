"""Report files from a real stories260k study, the Pareto front, and the export of the best mask."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

from search.commands.export import ExportError, removal_limit, select
from search.studydir.reader import pareto_mask, read_study
from search.study import main as study_main
from surgery.load import load_model
from surgery.mask import KeepMask
from surgery.masking import masked
from tests.search.test_study_cli import MODEL, run_study

STRATEGIES = [
    {"name": "greedy_finercut"},
    {"name": "sleb"},
    {"name": "exhaustive"},
]


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    """Exhaustive (352 masks meet 50% removed) on 2 x 32 calibration tokens at targets 50% and 60% removed."""
    return run_study(tmp_path_factory.mktemp("report"), strategies=STRATEGIES,
                     budget={"metric": "params", "targets": [0.5, 0.6]})


def test_pareto_mask_by_hand():
    size = pd.Series([1.0, 2.0, 2.0, 3.0, 4.0])
    quality = pd.Series([9.0, 5.0, 6.0, 7.0, 1.0])
    assert pareto_mask(size, quality).tolist() == [True, True, False, False, True]


def test_trials_csv_has_one_row_per_trial(study_dir):
    trials = pd.read_csv(study_dir / "trials.csv")
    data = read_study(study_dir)
    assert len(trials) == len(data.trials) > 0
    assert set(trials["strategy"]) == {"greedy_finercut", "sleb", "exhaustive"}
    row = trials[trials["mask"] == "AM,AM,AM,AM,--"].iloc[0]  # the last layer removed
    assert row["removed_attn"] == 1 and row["removed_ffn"] == 1 and row["params"] == 260032 - 45440
    assert row["kv_cache_bytes"] == 4 * 2 * 4 * 8 * 4  # 4 kept attentions x K,V x 4 kv heads x dim 8 x fp32
    masks = {KeepMask.parse(m) for m in trials["mask"]}
    assert all(m.removed_attn + m.removed_ffn == r for m, r in zip(map(KeepMask.parse, trials["mask"]), trials["removed"]))
    assert len(masks) == trials["mask"].nunique()


def test_front_is_pareto_and_names_finders(study_dir):
    front = pd.read_csv(study_dir / "front.csv")
    assert front["params"].is_monotonic_increasing and front["heldout_ppl"].is_monotonic_decreasing
    assert front["params"].iloc[-1] == 260032 and front["strategy"].iloc[-1] == "dense"
    data = read_study(study_dir)
    params = data.trials.drop_duplicates("mask").set_index("mask")["params"]
    for row in front.itertuples():
        assert math.isclose(row.heldout_ppl, data.heldout[row.mask])
        beaten = [m for m, p in data.heldout.items()
                  if p < row.heldout_ppl and params.get(m, 260032) <= row.params and m != row.mask]
        assert not beaten, f"{row.mask} is dominated by {beaten}"
    finders = {name for text in front["strategy"] for name in text.split("+")}
    assert finders <= {"greedy_finercut", "sleb", "exhaustive", "dense"} and "exhaustive" in finders


def test_summary_compares_with_exhaustive(study_dir):
    text = (study_dir / "summary.md").read_text(encoding="utf-8")
    data = read_study(study_dir)
    assert "## Budget: 50% of params removed (params <= 130016)" in text
    best = data.trials.drop_duplicates("mask")
    optimum = best[best["params"] <= 0.4 * 260032]["objective"].min()  # the true optimum at 60%
    result = data.records["exhaustive"].results["0.6"]
    assert math.isclose(best.set_index("mask")["objective"][result], optimum)
    assert "0 (optimum)" in text and "| exhaustive |" in text
    assert "at optimum" in text


def test_plots_and_no_temporary_files(study_dir):
    for name in ("pareto.png", "layers.png"):
        assert (study_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (study_dir / "pareto.html").read_text(encoding="utf-8")
    assert "plotly" in html and "greedy_finercut" in html
    assert not [p for p in study_dir.iterdir() if ".tmp" in p.name]


def test_report_command_rewrites_identically(study_dir, capsys):
    before = (study_dir / "front.csv").read_text()
    assert study_main(["report", str(study_dir)]) == 0
    assert "optuna-dashboard sqlite:///" in capsys.readouterr().out
    assert (study_dir / "front.csv").read_text() == before


def test_report_of_a_non_study_exits_2(tmp_path, capsys):
    assert study_main(["report", str(tmp_path)]) == 2
    assert "no config.yaml" in capsys.readouterr().err


def test_select_by_removed_count_and_params(study_dir):
    data = read_study(study_dir)
    assert removal_limit(0.3, 10) == 3 and removal_limit(4, 10) == 4
    best = select(data, max_removed=2, objective="calibration")
    two = data.trials[data.trials["removed"] == 2]
    assert best["removed"] == 2 and math.isclose(best["objective"], two["objective"].min())
    best = select(data, max_params=150000, objective="calibration")
    assert best["params"] <= 150000
    assert math.isclose(best["objective"], data.trials[data.trials["params"] <= 150000]["objective"].min())
    with pytest.raises(ExportError, match="no evaluated mask has at most 1000 parameters"):
        select(data, max_params=1000)
    with pytest.raises(ExportError, match="whole number"):
        removal_limit(2.5, 10)


def test_export_matches_masked_model(study_dir, tmp_path, capsys):
    out = tmp_path / "export"
    assert study_main(["export", str(study_dir), "--max-params", "200000", "--out", str(out)]) == 0
    assert "exported" in capsys.readouterr().out
    data = read_study(study_dir)
    best = select(data, max_params=200000)
    assert best["heldout_ppl"] == min(p for m, p in data.heldout.items()
                                      if data.trials.drop_duplicates("mask").set_index("mask")["params"].get(m, 1e9) <= 200000)
    exported = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    model, _ = load_model(str(MODEL), device="cpu")
    ids = torch.arange(1, 33).reshape(1, 32)
    with torch.no_grad(), masked(model, best["mask"]):
        expected = model(ids).logits
    torch.testing.assert_close(exported(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in exported.parameters()) == best["params"]
    assert study_main(["export", str(study_dir), "--max-params", "200000", "--out", str(out)]) == 2
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] >= 1


def test_extra_heldout_sets_and_the_seed_versus_own_table(tmp_path):
    """An extra held-out set is scored on every strategy result and the dense model, and the summary compares the
    best seed method with the best own strategy on each set."""
    train = MODEL.parents[1] / "text" / "tinystories_train_head.txt"
    extra = {"stories_train": {"files": [str(train)], "num_sequences": 4, "seq_len": 32, "seed": 2}}
    out = run_study(tmp_path, strategies=[{"name": "sleb"}, {"name": "greedy_per_cost"}],
                    budget={"metric": "params", "targets": [0.3]}, extra_heldout=extra)
    data = read_study(out)
    column = "heldout_ppl_stories_train"
    scored = data.extra_heldout[column]
    results = {m for r in data.records.values() for m in r.results.values()}
    assert set(scored) == results | {data.dense_mask}
    assert all(math.isfinite(p) and p > 1 for p in scored.values())
    trials = pd.read_csv(out / "trials.csv")
    assert column in trials.columns and trials[column].notna().sum() >= len(results)
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert "Seed methods vs the project's own search" in summary
    seed, own = data.records["sleb"].results["0.3"], data.records["greedy_per_cost"].results["0.3"]
    change = f"{scored[own] / scored[seed] - 1:+.1%}"
    assert f"| 0.3 | {column} | sleb |" in summary and change in summary


def test_comparison_says_when_the_best_own_mask_is_the_seed_mask():
    """A warm-started own strategy that returns a seed method's mask unchanged is a tie, and the table says so."""
    from types import SimpleNamespace

    from search.stored import StrategyRecord
    from search.studydir.report import comparison_frame

    data = SimpleNamespace(records={tag: StrategyRecord(name=tag) for tag in ("sleb", "evolutionary", "greedy_per_cost")},
                           extra_heldout={})
    results = pd.DataFrame({"target": [0.25, 0.25, 0.25, 0.5, 0.5],
                            "strategy": ["sleb", "evolutionary", "greedy_per_cost", "sleb", "greedy_per_cost"],
                            "mask": ["AM,--", "AM,--", "A-,AM", "--,A-", "-M,A-"],
                            "heldout_ppl": [10.0, 10.0, 11.0, 20.0, 18.0]})
    table = comparison_frame(data, results)
    assert table["change"].tolist() == ["+0.0% (same mask)", "-10.0%"]
    assert table["best own"].tolist() == ["evolutionary", "greedy_per_cost"]
