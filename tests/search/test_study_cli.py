"""`python -m search.study run`: validation before writing, a real study on stories260k, resume, SIGKILL."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from search.config import load_config
from search.study import main as study_main
from search.evaluation.workers import build_scorer
from search.record import PENALTY, planned_mask
from surgery.mask import KeepMask

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "studies" / "assets"
MODEL = ASSETS / "models" / "stories260k"
TEXT = ASSETS / "text" / "tinystories_valid.txt"

CHEAP_STRATEGIES = [
    {"name": "greedy_finercut"},
    {"name": "shortgpt"},
    {"name": "gromov"},
    {"name": "tpe", "settings": {"n_trials": 8, "n_startup_trials": 4, "seed": 0}},
]


def study_config(out: Path, strategies=None, **overrides) -> dict:
    """A small stories260k study: 2 x 32 calibration tokens, cheap strategy settings."""
    config = {
        "model": {"name": str(MODEL), "device": "cpu", "threads": 1},
        "calibration": {"files": [str(TEXT)], "end": 0.8, "num_sequences": 2, "seq_len": 32, "seed": 0},
        "heldout": {"files": [str(TEXT)], "start": 0.8, "num_sequences": 4, "seq_len": 32, "seed": 1},
        "objective": "kl",
        "budget": {"metric": "params", "targets": [0.2, 0.4]},
        "strategies": strategies if strategies is not None else CHEAP_STRATEGIES,
        "output_dir": str(out),
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def run_study(tmp_path: Path, name: str = "study", **overrides) -> Path:
    out = tmp_path / name
    config = write_config(tmp_path / f"{name}.yaml", study_config(out, **overrides))
    assert study_main(["run", str(config), "--no-progress"]) == 0
    return out


def trial_table(out: Path, name: str = "depthsearch") -> pd.DataFrame:
    storage = yaml.safe_load((out / "config.yaml").read_text()).get("storage") or f"sqlite:///{out / 'study.db'}"
    study = optuna.load_study(study_name=name, storage=storage)
    rows = [(t.user_attrs["strategy"], t.user_attrs["mask"], t.values[0]) for t in study.get_trials(deepcopy=False)]
    return pd.DataFrame(rows, columns=["strategy", "mask", "objective"])


# bad configs: exit 2, one message, nothing written ---------------------------------------------------------
BAD = {
    "unknown strategy": ({"strategies": [{"name": "greedy_finercat"}]}, "did you mean 'greedy_finercut'"),
    "missing model": ({"model": {"name": str(ASSETS / "models" / "nope")}}, "model.name: model path"),
    "infeasible budget": ({"budget": {"metric": "params", "targets": [0.95]}}, "budget.targets.0: params target 95%"),
    "same text": ({"heldout": {"start": 0.0, "end": 0.8, "seed": 0}}, "overlaps calibration text"),
    "wrong type": ({"calibration": {"num_sequences": "many"}}, "calibration.num_sequences"),
    "bad setting": ({"strategies": [{"name": "tpe", "settings": {"n_trails": 3}}]}, "strategies.0.settings"),
    "unknown budget": ({"budget": {"metric": "param"}}, "did you mean 'params'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_exits_2_and_writes_nothing(tmp_path, capsys, case):
    overrides, expected = BAD[case]
    out = tmp_path / "out"
    config = write_config(tmp_path / "bad.yaml", study_config(out, **overrides))
    assert study_main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err
    assert str(config) in err  # the file is named
    assert not out.exists()


def test_all_problems_reported_at_once(tmp_path, capsys):
    overrides = {"strategies": [{"name": "sleeb"}], "model": {"name": str(tmp_path / "missing")},
                 "heldout": {"start": 0.5, "end": 1.0}}
    out = tmp_path / "out"
    config = write_config(tmp_path / "bad.yaml", study_config(out, **overrides))
    assert study_main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert "3 problem(s)" in err
    assert "did you mean 'sleb'" in err and "model.name" in err and "overlaps calibration" in err
    assert not out.exists()


def test_malformed_yaml_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: [unclosed\n", encoding="utf-8")
    assert study_main(["run", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_identical_heldout_batches_rejected(tmp_path, capsys):
    """A copy of the calibration text under another name is caught by its content, before tokenising."""
    copy = tmp_path / "copy.txt"
    copy.write_text(TEXT.read_text(encoding="utf-8"), encoding="utf-8")
    out = tmp_path / "out"
    overrides = {"heldout": {"files": [str(copy)], "start": 0.0, "end": 0.8, "seed": 0, "num_sequences": 2}}
    config = write_config(tmp_path / "bad.yaml", study_config(out, **overrides))
    assert study_main(["run", str(config), "--no-progress"]) == 2
    assert "overlaps calibration text" in capsys.readouterr().err
    assert not out.exists()


# a real study -------------------------------------------------------------------------------------------
def test_run_records_every_strategy_and_resumes(tmp_path, capsys):
    out = run_study(tmp_path)
    summary_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary_line.startswith("done: ") and str(out / "summary.md") in summary_line
    study = optuna.load_study(study_name="depthsearch", storage=f"sqlite:///{out / 'study.db'}")
    attrs = study.user_attrs
    for entry in CHEAP_STRATEGIES:
        record = attrs[f"strategy:{entry['name']}"]
        assert record["done"] and set(record["results"]) == {"0.2", "0.4"}
        assert record["evaluations"] >= 1
    assert attrs["meta"]["dense"]["params"] == 260032
    assert (out / "config.yaml").is_file() and (out / "trials.csv").is_file()
    trials = trial_table(out)
    heldout = dict(attrs["heldout"]["ppl"])
    assert str("AM,AM,AM,AM,AM") in heldout and all(v > 1 for v in heldout.values())

    # resume: nothing evaluated again, same results
    assert study_main(["run", str(tmp_path / "study.yaml"), "--no-progress"]) == 0
    pd.testing.assert_frame_equal(trial_table(out), trials)
    study = optuna.load_study(study_name="depthsearch", storage=f"sqlite:///{out / 'study.db'}")
    assert study.user_attrs["heldout"]["ppl"] == heldout


def test_changed_calibration_refuses_to_resume(tmp_path, capsys):
    out = run_study(tmp_path, strategies=[{"name": "shortgpt"}])
    config = write_config(tmp_path / "other.yaml",
                          study_config(out, strategies=[{"name": "shortgpt"}], calibration={"seed": 5}))
    assert study_main(["run", str(config), "--no-progress"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_journal_storage(tmp_path):
    out = tmp_path / "journal"
    config = write_config(tmp_path / "j.yaml", study_config(out, strategies=[{"name": "shortgpt"}],
                                                           storage=str(tmp_path / "journal.log")))
    assert study_main(["run", str(config), "--no-progress"]) == 0
    assert (tmp_path / "journal.log").stat().st_size > 0 and not (out / "study.db").exists()
    assert len(pd.read_csv(out / "trials.csv")) >= 1


def test_dry_run_prints_plan_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    config = write_config(tmp_path / "ok.yaml", study_config(out))
    assert study_main(["run", str(config), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "dense params: 260032 parameters; 5 layers, 2^10 masks" in plan
    assert "target 40.0%: params <= 156019" in plan
    assert not out.exists()


# SIGKILL mid-run loses no completed trial ------------------------------------------------------------------
def _count_trials(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=1) as conn:
            return conn.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


@pytest.mark.slow
def test_sigkill_loses_no_trial_and_resume_matches_uninterrupted(tmp_path):
    strategies = [{"name": "greedy_finercut"}, {"name": "exhaustive"}]
    reference = run_study(tmp_path, "reference", strategies=strategies)
    out = tmp_path / "killed"
    config = write_config(tmp_path / "killed.yaml", study_config(out, strategies=strategies))
    command = [sys.executable, "-m", "search.study", "run", str(config), "--no-progress"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _count_trials(out / "study.db") < 60 and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "the study finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    before = trial_table(out)
    assert len(before) >= 60 and "summary.md" not in os.listdir(out)

    assert study_main(["run", str(config), "--no-progress"]) == 0
    after = trial_table(out)
    pd.testing.assert_frame_equal(after.iloc[: len(before)], before)  # no completed trial lost or redone
    key = ["strategy", "mask"]
    expected = trial_table(reference).sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(after.sort_values(key).reset_index(drop=True), expected)
    done = optuna.load_study(study_name="depthsearch", storage=f"sqlite:///{out / 'study.db'}").user_attrs
    ref = optuna.load_study(study_name="depthsearch", storage=f"sqlite:///{reference / 'study.db'}").user_attrs
    for tag in ("greedy_finercut", "exhaustive"):
        assert done[f"strategy:{tag}"]["results"] == ref[f"strategy:{tag}"]["results"]
    assert done["heldout"]["ppl"] == ref["heldout"]["ppl"]


@pytest.mark.slow
def test_ray_executor_study_matches_in_process(tmp_path):
    """executor ray: greedy batches on Ray actors, TPE and NSGA-II trials as Ray Tune trials; greedy trials equal
    in-process, and every Tune trial's value is the in-process score of its mask."""
    strategies = [{"name": "greedy_finercut"}, {"name": "tpe", "settings": {"n_trials": 6, "seed": 0}},
                  {"name": "nsga2", "settings": {"n_trials": 6, "population_size": 3, "seed": 0}}]
    local = trial_table(run_study(tmp_path, "local", strategies=strategies))
    on_ray = trial_table(run_study(tmp_path, "ray", strategies=strategies, executor={"kind": "ray", "workers": 2}))
    greedy = lambda table: table[table.strategy == "greedy_finercut"].set_index("mask").objective.sort_index()  # noqa: E731
    pd.testing.assert_series_equal(greedy(on_ray), greedy(local))
    tuned = on_ray[on_ray.strategy == "tpe"]
    assert len(tuned) >= 3 and tuned.objective.notna().all()
    storage = f"sqlite:///{tmp_path / 'ray' / 'study.db'}"
    study = optuna.load_study(study_name="depthsearch:tpe:0.2", storage=storage)
    assert len(study.get_trials(deepcopy=False)) == 6  # every Tune trial counted for resume
    nsga = optuna.load_study(study_name="depthsearch:nsga2", storage=storage).get_trials(deepcopy=False)
    assert len(nsga) == 6 and all(len(t.values) == 2 for t in nsga)  # (objective, fraction kept) per Tune trial
    assert all("constraints:budget" in t.system_attrs for t in nsga)
    sampled = on_ray[on_ray.strategy.isin(["tpe", "nsga2"])]
    assert (sampled.strategy == "nsga2").any()
    scorer = build_scorer(load_config(tmp_path / "ray.yaml"))
    for mask, value in zip(sampled["mask"], sampled.objective):
        assert value == scorer.score(KeepMask.parse(mask))


def _working_trials(db: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name=name, storage=f"sqlite:///{db}").get_trials(deepcopy=False)
    except Exception:  # not created yet (KeyError), or the database is being written
        return []


@pytest.mark.slow
def test_sigkill_during_ray_tune_loses_no_trial(tmp_path):
    """executor ray: every Tune trial is stored the moment it finishes; a run killed in the middle of a sampler's
    Tune trials resumes with them (same values, none redone), finishes the one it left RUNNING, runs the rest."""
    n_trials, name = 16, "depthsearch:tpe:0.2"
    strategies = [{"name": "tpe", "settings": {"n_trials": n_trials, "n_startup_trials": 4, "seed": 0}}]
    out = tmp_path / "killed"
    config = write_config(tmp_path / "killed.yaml", study_config(out, strategies=strategies, budget={"targets": [0.2]},
                                                                 executor={"kind": "ray", "workers": 2}))
    command = [sys.executable, "-m", "search.study", "run", str(config), "--no-progress"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    done = lambda: [t for t in _working_trials(out / "study.db", name) if t.state.is_finished()]  # noqa: E731
    deadline = time.time() + 240
    while len(done()) < 4 and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert process.poll() is None, "the study finished before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    before = {t.number: (t.params, t.values) for t in done()}
    assert 4 <= len(before) < n_trials and "summary.md" not in os.listdir(out)

    assert study_main(["run", str(config), "--no-progress"]) == 0
    trials = _working_trials(out / "study.db", name)
    assert len(trials) == n_trials and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert {t.number: (t.params, t.values) for t in trials if t.number in before} == before  # kept, not redone
    recorded = trial_table(out)
    scored = {str(planned_mask(t, 10)) for t in trials if t.values[0] < PENALTY}  # within the budget
    assert sorted(recorded["mask"]) == sorted(scored)  # each in the main study, once
    scorer = build_scorer(load_config(config))
    for mask, value in zip(recorded["mask"], recorded["objective"]):
        assert value == scorer.score(KeepMask.parse(mask))
