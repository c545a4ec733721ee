"""The recommended mask per budget: validation text, the candidate pool, recommended.csv, ranks, export's default."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from objectives.benchmarks import evaluated_rows_problems
from objectives.calibration import TextSource, row_span
from objectives.scorer import MaskScorer
from search.config import config_problems, load_config
from search.record import open_record
from search.selection import Scored
from search.study import main as study_main
from surgery.mask import KeepMask
from tests.search.test_study_cli import ASSETS, TEXT, run_study, study_config, write_config

WIKI = ASSETS / "text" / "wikitext2_test.raw"
VALIDATION = {
    "stories": {"files": [str(TEXT)], "start": 0.6, "end": 0.8, "num_sequences": 4, "seq_len": 32, "seed": 2},
    "wiki": {"files": [str(WIKI)], "start": 0.5, "end": 0.6, "num_sequences": 4, "seq_len": 32, "seed": 2},
}
STRATEGIES = [{"name": "shortgpt"}, {"name": "sleb"}, {"name": "greedy_finercut"}]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("selection")
    return run_study(tmp, strategies=STRATEGIES, calibration={"end": 0.6}, validation=VALIDATION,
                     selection={"candidates": 3})


def _cache(out):
    config = load_config(out / "config.yaml")
    return open_record(f"sqlite:///{out / 'study.db'}", create=False).validation_cache(), config


def test_pool_holds_every_result_and_the_best_others(study):
    cache, _ = _cache(study)
    trials = pd.read_csv(study / "trials.csv").drop_duplicates("mask")
    dense = open_record(f"sqlite:///{study / 'study.db'}", create=False).meta().dense["params"]
    for key, pool in cache["pool"].items():
        results = [r.results[key] for r in _records(study).values()]
        assert set(results) <= set(pool)
        feasible = trials[(trials["params"] <= (1 - float(key)) * dense) & ~trials["mask"].isin(results)]
        best = feasible.sort_values(["objective", "mask"])["mask"].tolist()[:3]
        assert [m for m in pool if m not in results] == best
    assert set(cache["windows"]) >= {m for ms in cache["pool"].values() for m in ms}
    assert all(set(w) == {"stories", "wiki"} and all(len(v) == 4 for v in w.values()) for w in cache["windows"].values())


def _records(out):
    return open_record(f"sqlite:///{out / 'study.db'}", create=False).strategy_records()


def test_recommended_csv_is_the_pool_minimum(study):
    cache, _ = _cache(study)
    chosen = pd.read_csv(study / "recommended.csv")
    assert {"target", "mask", "strategy", "validation_ppl", "worst_domain", "lead", "lead_se", "reason"} <= set(chosen.columns)
    assert sorted(chosen["target"]) == [0.2, 0.4]
    for row in chosen.itertuples():
        pool = cache["pool"][format(row.target, "g")]
        values = {m: Scored(cache["windows"][m]).value for m in pool}
        assert row.mask == min(values, key=values.get)
        assert row.validation_ppl == pytest.approx(math.exp(values[row.mask]))
        assert row.lead == pytest.approx(sorted(values.values())[1] - sorted(values.values())[0])
    summary = (study / "summary.md").read_text()
    assert "## Recommended mask per budget" in summary and "calibration vs validation" in summary


def test_validation_windows_are_the_scorer_values(study):
    cache, config = _cache(study)
    from objectives.calibration import token_batch
    from search.config import text_source
    from surgery.load import load_model, load_tokenizer

    model = load_model(config.model.name)[0]
    ids = token_batch(text_source(config, config.validation["wiki"]), load_tokenizer(config.model.name))
    scorer = MaskScorer(model, ids, "ppl")
    mask = next(iter(cache["pool"].values()))[0]
    assert cache["windows"][mask]["wiki"] == pytest.approx(scorer.window_values(KeepMask.parse(mask)), rel=1e-5)
    mean = sum(cache["windows"][mask]["wiki"]) / 4
    assert math.exp(mean) == pytest.approx(scorer.score(KeepMask.parse(mask)), rel=1e-5)


def test_export_defaults_to_the_recommended_mask(study, tmp_path, capsys):
    chosen = pd.read_csv(study / "recommended.csv").set_index("target")
    assert study_main(["export", str(study), "--target", "0.4", "--out", str(tmp_path / "a")]) == 0
    assert "chosen: " in capsys.readouterr().out
    written = json.loads((tmp_path / "a" / "depthsearch-export.json").read_text())
    assert written["mask"] == chosen.loc[0.4, "mask"]
    assert "| selected_because | lowest mean log-perplexity" in (tmp_path / "a" / "README.md").read_text()
    dense = open_record(f"sqlite:///{study / 'study.db'}", create=False).meta().dense["params"]
    assert study_main(["export", str(study), "--max-params", str(0.6 * dense), "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "depthsearch-export.json").read_text())["mask"] == chosen.loc[0.4, "mask"]


def test_export_refuses_a_target_the_study_has_not(study, tmp_path, capsys):
    assert study_main(["export", str(study), "--target", "0.3", "--out", str(tmp_path / "c")]) == 2
    assert "not a target of this study (targets: 0.2, 0.4)" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_resume_scores_no_candidate_twice(study, tmp_path):
    before, _ = _cache(study)
    config = write_config(tmp_path / "again.yaml", study_config(study, strategies=STRATEGIES, calibration={"end": 0.6},
                                                               validation=VALIDATION, selection={"candidates": 3}))
    assert study_main(["run", str(config), "--no-progress"]) == 0
    after, _ = _cache(study)
    assert after["windows"] == before["windows"] and after["wall_s"] == before["wall_s"]


@pytest.mark.parametrize("part, other", [({"start": 0.5, "end": 0.7}, "calibration"),
                                         ({"start": 0.75, "end": 0.9}, "heldout")])
def test_validation_overlapping_other_text_is_refused(tmp_path, capsys, part, other):
    validation = {"stories": {**VALIDATION["stories"], **part}}
    config = write_config(tmp_path / "s.yaml", study_config(tmp_path / "out", calibration={"end": 0.6},
                                                            validation=validation))
    assert study_main(["run", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err
    text = f"overlaps {other} text" if other == "calibration" else "heldout: text"
    assert "validation.stories" in err and text in err
    assert not (tmp_path / "out").exists()


def test_row_span_and_the_benchmark_rows_guard(tmp_path):
    rows = tmp_path / "b.jsonl"
    rows.write_text("".join(json.dumps({"query": f"row {i} " + "x" * 20}) + "\n" for i in range(10)))
    assert row_span(TextSource(files=(str(rows),), field="query")) == (0, 9)
    assert row_span(TextSource(files=(str(rows),), field="query", start=0.5)) == (5, 9)
    boolq = ASSETS / "benchmarks" / "boolq.jsonl"
    late = TextSource(files=(str(boolq),), field="query", start=0.5)
    assert evaluated_rows_problems([("calibration", late)], ["boolq"], 500, None) == []
    problems = evaluated_rows_problems([("calibration", late)], ["boolq"], None, None)
    assert problems and "confirm task 'boolq' evaluates every row" in problems[0]
    early = evaluated_rows_problems([("validation.q", TextSource(files=(str(boolq),), field="query"))],
                                    ["arc_easy", "boolq"], 50, {"boolq": 100})
    assert len(early) == 1 and "its first 100 rows" in early[0]


def test_config_refuses_calibration_on_evaluated_rows(tmp_path):
    boolq = ASSETS / "benchmarks" / "boolq.jsonl"
    data = study_config(tmp_path / "out", confirm={"tasks": ["boolq"], "limit": 200},
                        extra_calibration={"q": {"files": [str(boolq)], "field": "query", "num_sequences": 2,
                                                 "seq_len": 32}})
    config = load_config(write_config(tmp_path / "s.yaml", data))
    assert any("extra_calibration.q: reads rows 0-" in p for p in config_problems(config))


def test_lead_standard_error_is_the_paired_one():
    a = Scored({"x": [1.0, 2.0, 3.0], "y": [1.0, 1.0, 1.0, 1.0]})
    b = Scored({"x": [1.5, 2.1, 3.9], "y": [1.2, 1.0, 1.4, 1.2]})
    diffs_x, diffs_y = torch.tensor([0.5, 0.1, 0.9]), torch.tensor([0.2, 0.0, 0.4, 0.2])
    expected = math.sqrt((diffs_x.var() / 3 + diffs_y.var() / 4).item()) / 2
    assert a.lead_se(b) == pytest.approx(expected)
    assert b.value - a.value == pytest.approx((diffs_x.mean() + diffs_y.mean()).item() / 2)
    assert a.worst == ("x", 2.0)


def test_worst_domain_reduction():
    a = Scored({"x": [1.0, 2.0, 3.0], "y": [4.0, 4.0, 4.0]}, reduce="worst")
    b = Scored({"x": [1.0, 2.0, 3.0], "y": [4.5, 4.1, 4.4]}, reduce="worst")
    assert a.value == 4.0 and b.value == pytest.approx(13.0 / 3)
    assert a.lead_se(b) == pytest.approx(torch.tensor([0.5, 0.1, 0.4]).std().item() / math.sqrt(3))
