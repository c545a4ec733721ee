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

ROOT = Path(__file__).resolve().parents[1]
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
    assert list(ok.index) == ["tinystories_ppl"]
    ppl = ok.loc["tinystories_ppl"]
    assert ppl["dense"] < ppl["pruned"] and ppl["metric"] == "word_perplexity"
    assert ppl["pruned_retained_pct"] == pytest.approx(100 * ppl["dense"] / ppl["pruned"])
    assert (frame[frame["status"] == "failed"]["candidate"] == bad.name).all()
    record = json.loads((out / good.name / "result.json").read_text())
    assert record["heal_mode"] == "lora-float32" and record["heal_seconds"] > 0
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
    assert len(frame) == 2 and (frame["status"] == "ok").all() and frame["healed"].notna().all()
    assert cli(["confirm", str(study_dir), "--tasks", "tinystory_ppl", "--no-progress"]) == 2
    assert "did you mean 'tinystories_ppl'" in capsys.readouterr().err
