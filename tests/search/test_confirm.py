"""The confirm step: settings, candidate choice, resumable per-candidate healing + benchmarks, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from search.commands import confirm as C
from search.config import ConfigError, load_config
from search.record import MAIN_STUDY
from search.study import main as cli

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "studies" / "assets"
QUICK = {"tasks": ["tinystories_ppl", "tinystories_next"], "limit": 6,
         "heal": {"steps": 3, "batch_size": 2, "seq_len": 64, "rank": 2, "warmup": 0}}


def write_config(folder: Path, confirm: dict, strategies=("gromov",)) -> Path:
    text = str(ASSETS / "text" / "tinystories_valid.txt")
    data = {
        "model": {"name": str(ASSETS / "models" / "stories260k"), "device": "cpu"},
        "calibration": {"files": [text], "end": 0.8, "num_sequences": 4, "seq_len": 64},
        "heldout": {"files": [text], "start": 0.8, "num_sequences": 4, "seq_len": 64, "seed": 1},
        "budget": {"targets": [0.2, 0.4]},
        "strategies": [{"name": s} for s in strategies],
        "confirm": confirm,
        "output_dir": str(folder / "study"),
    }
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def empty_study(tmp_path: Path) -> Path:
    """A study directory whose storage holds the main study but no trial."""
    study_dir = tmp_path / "study"
    study_dir.mkdir()
    (study_dir / "config.yaml").write_text(write_config(tmp_path, QUICK).read_text())
    optuna.create_study(study_name=MAIN_STUDY, storage=f"sqlite:///{study_dir / 'study.db'}",
                        directions=["minimize", "minimize"])
    return study_dir


def test_confirm_settings_report_every_bad_key(tmp_path):
    config = load_config(write_config(tmp_path, {"tasks": [], "heal": {"rank": 0, "quantize": "8bit", "x": 1}}))
    with pytest.raises(ConfigError) as error:
        C.confirm_settings(config)
    message = str(error.value)
    for key in ("confirm.tasks", "confirm.heal.rank", "confirm.heal.quantize", "confirm.heal.x"):
        assert key in message
    assert "4 problem(s)" in message


def test_study_without_completed_trials_exits_2(tmp_path, capsys):
    study_dir = empty_study(tmp_path)
    assert cli(["confirm", str(study_dir), "--no-progress"]) == 2
    assert "no completed trials" in capsys.readouterr().err


def test_missing_study_directory_exits_2(tmp_path, capsys):
    assert cli(["confirm", str(tmp_path / "nowhere")]) == 2
    assert "no config.yaml" in capsys.readouterr().err


def test_candidates_per_budget_and_top_k():
    front = pd.DataFrame({"mask": ["a", "b", "c"], "strategy": ["s"] * 3, "params": [90.0, 70.0, 50.0],
                          "removed_fraction": [0.1, 0.3, 0.5], "heldout_ppl": [5.0, 7.0, 9.0]})
    assert [c.mask for c in C.pick_candidates(front, "params", top_k=2, budgets=[])] == ["a", "b"]
    picked = C.pick_candidates(front, "params", top_k=1, budgets=[0.25, 0.3, 0.45])
    assert [(c.mask, c.why) for c in picked] == [("b", "budget 0.25"), ("c", "budget 0.45")]
    with pytest.raises(ValueError, match="no front mask removes >= 60%"):
        C.pick_candidates(front, "params", top_k=1, budgets=[0.6])


def test_confirm_heals_benchmarks_exports_and_resumes(tmp_path):
    config = load_config(write_config(tmp_path, {**QUICK, "tasks": ["tinystories_ppl"], "limit": 4}))
    settings = C.confirm_settings(config)
    good = C.Candidate("AM,AM,A-,AM,-M", "manual", 0.12, 0.0, 0.0, "test")
    bad = C.Candidate("AM,AM", "manual", 0.5, 0.0, 0.0, "wrong layer count")
    sources = C.corpus_sources(config, settings.heal.corpus)
    study_dir = tmp_path / "study"
    assert C.confirm(study_dir, config, settings, [good, bad], sources, progress=False) == 1  # one failed
    out = study_dir / "confirm"
    frame = pd.read_csv(out / "confirm.csv")
    ok = frame[frame["status"] == "ok"].set_index("task")
    assert list(ok.index) == ["tinystories_ppl", "heldout_ppl"]
    ppl = ok.loc["tinystories_ppl"]
    assert ppl["dense"] < ppl["pruned"] and ppl["metric"] == "word_perplexity"
    assert ppl["pruned_retained_pct"] == pytest.approx(100 * ppl["dense"] / ppl["pruned"])
    assert (frame[frame["status"] == "failed"]["candidate"] == bad.name).all()
    record = json.loads((out / good.name / "result.json").read_text())
    assert sorted(record["variants"]) == ["healed", "pruned"]  # no repair unless asked
    healed = record["variants"]["healed"]
    assert healed["heal_mode"] == "lora-float32" and healed["build_seconds"] >= healed["heal_seconds"] > 0
    assert (out / good.name / "healed" / "model.safetensors").is_file()
    assert "FAILED" in (out / "confirm.md").read_text() and (out / "confirm.png").stat().st_size > 0
    stamp = (out / good.name / "result.json").stat().st_mtime_ns
    assert C.confirm(study_dir, config, settings, [good], sources, progress=False) == 0
    assert (out / good.name / "result.json").stat().st_mtime_ns == stamp  # finished candidate not redone


@pytest.mark.slow
def test_run_then_confirm_from_the_command_line(tmp_path, capsys):
    path = write_config(tmp_path, QUICK)
    assert cli(["run", str(path), "--no-progress"]) == 0
    study_dir = tmp_path / "study"
    assert cli(["confirm", str(study_dir), "--top", "1", "--no-progress"]) == 0
    frame = pd.read_csv(study_dir / "confirm" / "confirm.csv")
    assert (frame["status"] == "ok").all() and frame["healed"].notna().all()
    assert sorted(frame["kind"]) == ["heldout", "task", "task"]  # one row per task plus held-out perplexity
    assert cli(["confirm", str(study_dir), "--tasks", "tinystory_ppl", "--no-progress"]) == 2
    assert "did you mean 'tinystories_ppl'" in capsys.readouterr().err


# repair variants, standard errors, held-out perplexity, caches ---------------------------------------------
REPAIRED = {**QUICK, "tasks": ["tinystories_next"], "limit": 6, "repair": "linear", "repair_sequences": 4,
            "repair_seq_len": 64, "repair_calibration": [str(ASSETS / "text" / "tinystories_valid.txt") + ":0:0.8"]}
MASK = "AM,AM,A-,AM,-M"


def confirm_once(tmp_path, confirm: dict, **kwargs):
    config = load_config(write_config(tmp_path, confirm))
    settings = C.confirm_settings(config)
    cand = C.Candidate(MASK, "manual", 0.12, 0.0, 0.0, "test")
    study_dir = tmp_path / "study"
    code = C.confirm(study_dir, config, settings, [cand], C.corpus_sources(config, None), progress=False,
                     calibration=C.repair_texts(config, settings), **kwargs)
    return code, config, study_dir / "confirm", cand


def test_repair_variants_with_stderr_and_heldout_perplexity(tmp_path):
    import math

    import torch

    from objectives.calibration import token_batch
    from objectives.scorer import MaskScorer
    from search.config import text_source
    from surgery.load import load_model
    from surgery.mask import KeepMask
    from surgery.masking import masked
    from surgery.repair import fit_for_export, folded

    code, config, out, cand = confirm_once(tmp_path, REPAIRED)
    assert code == 0
    record = json.loads((out / cand.name / "result.json").read_text())
    variants = record["variants"]
    assert sorted(variants) == ["healed", "pruned", "repaired", "repaired_healed"]
    frame = pd.read_csv(out / "confirm.csv").set_index("task")
    acc = frame.loc["tinystories_next"]
    for variant in ("dense", "pruned", "repaired", "healed", "repaired_healed"):  # lm-eval's closed form
        p, n = acc[variant], variants.get(variant, {}).get("scores", {}).get("tinystories_next", {}).get("samples", 6)
        assert n == 6 and acc[f"{variant}_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))
    # held-out perplexity: the study's own measure of the mask (pruned) and of the mask with the same repair folded
    model, tokenizer = load_model(str(ASSETS / "models" / "stories260k"), device="cpu")
    ids = token_batch(text_source(config, config.heldout), tokenizer)
    mask = KeepMask.parse(MASK)
    assert frame.loc["heldout_ppl", "pruned"] == pytest.approx(MaskScorer(model, ids, "ppl").score(mask), rel=1e-4)
    repair = fit_for_export(model, tokenizer, mask, C.repair_texts(config, C.confirm_settings(config)),
                            sequences=4, seq_len=64)
    with folded(model, repair), masked(model, mask), torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert frame.loc["heldout_ppl", "repaired"] == pytest.approx(math.exp(nll.item()), rel=1e-4)
    assert frame.loc["heldout_ppl", "repaired"] != pytest.approx(frame.loc["heldout_ppl", "pruned"])
    # repaired+LoRA heals the repaired weights: same data and seed as LoRA alone, another starting loss
    assert variants["repaired_healed"]["heal_loss_first"] != pytest.approx(variants["healed"]["heal_loss_first"])
    assert variants["repaired_healed"]["build_seconds"] > variants["repaired_healed"]["repair_seconds"] > 0
    for variant in variants:
        assert (out / cand.name / variant / "config.json").is_file()
    text = (out / "confirm.md").read_text()
    assert "repaired+LoRA" in text and " ± " in text and "Won back" in text


def test_dense_measured_once_and_finished_variants_reused(tmp_path):
    quick = {**REPAIRED, "export": False, "variants": ["dense", "pruned", "repaired"]}
    code, _, out, cand = confirm_once(tmp_path, quick)
    assert code == 0 and not (out / cand.name / "pruned").exists()  # export: false
    dense = next(out.glob("dense-*.json"))
    stamps = {p.name: p.stat().st_mtime_ns for p in [dense, *(out / cand.name).glob("*.json")]}
    assert sorted(stamps) == [dense.name, "pruned.json", "repaired.json", "result.json"]
    # more variants, other healing: dense and the finished variants are reused, healing runs
    code, _, out, _ = confirm_once(tmp_path, {**quick, "variants": [], "heal": {**QUICK["heal"], "steps": 2}})
    assert code == 0
    assert dense.stat().st_mtime_ns == stamps[dense.name] and len(list(out.glob("dense-*.json"))) == 1
    record = json.loads((out / cand.name / "result.json").read_text())
    assert sorted(record["variants"]) == ["healed", "pruned", "repaired", "repaired_healed"]
    for name in ("pruned.json", "repaired.json"):  # healing settings are not part of their fingerprint
        assert (out / cand.name / name).stat().st_mtime_ns == stamps[name]
    # another task list: the dense model is measured again under its own fingerprint
    code, _, out, _ = confirm_once(tmp_path, {**quick, "tasks": ["tinystories_ppl"]})
    assert code == 0 and len(list(out.glob("dense-*.json"))) == 2


# masks from a CSV (a study's recommended.csv, or masks chosen elsewhere) -------------------------------------
@pytest.mark.parametrize("text, expected", [
    (None, "no such file"),
    (b"\xff\xfe\x00garbage", "not a readable CSV"),
    ("mask\nAM\n", "needs the columns target and mask (it has: mask)"),
    ("target,mask\n", "has no rows"),
    ('target,mask\n0.2,"AM,XX,AM,AM,AM"\n', "line 2: bad mask item 'XX' at layer 1"),
    ('target,mask\n0.2,"AM,AM"\n', "line 2: mask AM,AM has 2 layers but the model has 5"),
    ('target,mask\n1.5,"AM,AM,AM,AM,--"\nabc,"AM,AM,AM,AM,--"\n',
     ["line 2: target '1.5' is not a fraction in (0, 1)", "line 3: target 'abc' is not a number"]),
])
def test_bad_masks_csv_exits_2_and_writes_nothing(tmp_path, capsys, text, expected):
    from tests.faults import refused

    config = write_config(tmp_path, QUICK)
    masks = tmp_path / "masks.csv"
    if text is not None:
        masks.write_bytes(text if isinstance(text, bytes) else text.encode())
    argv = ["confirm", str(tmp_path / "results"), "--config", str(config), "--masks", str(masks), "--no-progress"]
    refused(capsys, cli, argv, expected, tmp_path)


def test_masks_without_a_study_need_config(tmp_path, capsys):
    from tests.faults import refused

    masks = tmp_path / "masks.csv"
    masks.write_text('target,mask\n0.2,"AM,AM,AM,AM,--"\n')
    refused(capsys, cli, ["confirm", str(tmp_path / "results"), "--masks", str(masks)],
            "holds no study (no config.yaml): with --masks, name the study config", tmp_path)


@pytest.mark.slow
def test_masks_csv_confirmed_without_a_study(tmp_path, capsys):
    config = write_config(tmp_path, {**QUICK, "tasks": ["tinystories_next"], "limit": 4})
    masks = tmp_path / "recommended.csv"
    masks.write_text('target,mask,strategy\n0.2,"AM,AM,A-,AM,-M",evolutionary\n0.25,"AM,AM,A-,AM,-M",learned\n'
                     '0.4,"AM,--,AM,AM,--",\n')
    out = tmp_path / "results"
    argv = ["confirm", str(out), "--config", str(config), "--masks", str(masks), "--no-progress"]
    assert cli(argv) == 0
    frame = pd.read_csv(out / "confirm" / "confirm.csv")
    firsts = frame.drop_duplicates("candidate")
    assert list(firsts["mask"]) == ["AM,AM,A-,AM,-M", "AM,--,AM,AM,--"]  # a repeated mask is confirmed once
    assert list(firsts["strategy"]) == ["evolutionary", "csv"] and list(firsts["removed_fraction"]) == [0.2, 0.4]
    assert frame["pruned"].notna().all() and frame["healed"].notna().all()
    stamps = {p: p.stat().st_mtime_ns for p in (out / "confirm").rglob("*.json")}
    assert cli(argv) == 0  # everything reused
    assert {p: p.stat().st_mtime_ns for p in (out / "confirm").rglob("*.json")} == stamps


def test_limits_override_and_its_bad_values(tmp_path, capsys):
    from tests.faults import refused

    assert C.task_limits(["lambada_openai=all", "hellaswag=200"]) == {"lambada_openai": None, "hellaswag": 200}
    config = write_config(tmp_path, QUICK)
    masks = tmp_path / "masks.csv"
    masks.write_text('target,mask\n0.2,"AM,AM,AM,AM,--"\n')
    for bad in ("hellaswag", "hellaswag=0", "=5", "piqa=many"):
        argv = ["confirm", str(tmp_path / "results"), "--config", str(config), "--masks", str(masks), "--limits", bad]
        refused(capsys, cli, argv, f"--limits {bad!r}: expected TASK=N", tmp_path)
