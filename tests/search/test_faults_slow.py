"""Fault injection with real processes (slow): SIGKILL / SIGTERM / SIGINT in the middle of an Optuna sampler, a kill
during an export, a full disk. A re-run gives the same trials.csv as an uninterrupted run; an export directory is
at every moment the previous export or the complete new one; a full disk is one message and exit 2."""

from __future__ import annotations

import os
import resource
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from search.study import main as study_main
from surgery.export import main as export_main
from surgery.export_target import MARKER, foreign_entries
from tests.faults import MODEL, model_copy, study_config, tree, write_yaml

ROOT = Path(__file__).resolve().parents[2]
STRATEGIES = [{"name": "shortgpt"},
              {"name": "tpe", "settings": {"n_trials": 40, "n_startup_trials": 5, "seed": 0}},
              {"name": "nsga2", "settings": {"n_trials": 24, "population_size": 6}}]

pytestmark = pytest.mark.slow


def _sampler_trials(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=1) as conn:
            return conn.execute("select count(*) from trials t join studies s on t.study_id = s.study_id "
                                "where s.study_name like 'depthsearch:tpe%'").fetchone()[0]
    except sqlite3.Error:
        return 0


def _states(out: Path) -> set[str]:
    storage = f"sqlite:///{out / 'study.db'}"
    return {t.state.name for s in optuna.get_all_study_summaries(storage)
            for t in optuna.load_study(study_name=s.study_name, storage=storage).get_trials(deepcopy=False)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    config = write_yaml(root / "ref.yaml", study_config(root / "ref", strategies=STRATEGIES))
    assert study_main(["run", str(config), "--no-progress"]) == 0
    return (root / "ref" / "trials.csv").read_text()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_signal_inside_a_sampler_then_rerun_equals_uninterrupted(tmp_path, reference, sig):
    out = tmp_path / "killed"
    config = write_yaml(tmp_path / "killed.yaml", study_config(out, strategies=STRATEGIES))
    command = [sys.executable, "-m", "search.study", "run", str(config), "--no-progress"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while _sampler_trials(out / "study.db") < 12 and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    assert process.poll() is None, "the study finished before it could be stopped"
    os.kill(process.pid, sig)
    _, err = process.communicate(timeout=60)
    assert process.returncode == (-9 if sig == signal.SIGKILL else 128 + sig), err
    if sig != signal.SIGKILL:
        assert f"interrupted by {sig.name}" in err and "Traceback" not in err, err
    assert "summary.md" not in os.listdir(out)

    assert study_main(["run", str(config), "--no-progress"]) == 0
    assert (out / "trials.csv").read_text() == reference  # same masks, order, values and held-out scores
    assert _states(out) == {"COMPLETE"}  # no trial left RUNNING in any working study


def _complete_export(path: Path) -> bool:
    return path.is_dir() and (path / MARKER).is_file() and foreign_entries(path) is None


def test_kill_during_export_leaves_the_previous_export_then_is_cleaned(tmp_path):
    model = model_copy(tmp_path)
    out = tmp_path / "pruned"
    assert export_main(["--model", str(model), "--mask", "AM,AM,AM,AM,--", "--out", str(out)]) == 0
    previous = tree(out)
    command = [sys.executable, "-m", "surgery.export", "--model", str(model), "--mask", "AM,A-,-M,AM,--",
               "--out", str(out), "--force"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".pruned.tmp-*")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.001)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert _complete_export(out)  # the previous export, or (killed after the rename) the complete new one
    leftovers = list(tmp_path.glob(".pruned.*"))
    if leftovers:
        assert tree(out) == previous
    assert export_main(["--model", str(model), "--mask", "AM,A-,-M,AM,--", "--out", str(out), "--force"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "pruned"]  # leftovers cleaned up
    assert _complete_export(out)


def _error_lines(stderr: str) -> int:
    return sum(line.startswith("error: ") for line in stderr.splitlines())


def _full_disk(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_full_disk_is_one_message_and_nothing_half_written(tmp_path):
    model = model_copy(tmp_path)
    out = tmp_path / "pruned"
    command = [sys.executable, "-m", "surgery.export", "--model", str(model), "--mask", "AM,A-,-M,AM,--",
               "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, preexec_fn=_full_disk(200_000))
    assert done.returncode == 2 and _error_lines(done.stderr) == 1, done.stderr  # (progress bars aside)
    assert "error: the disk is full" in done.stderr and "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    study = tmp_path / "study"
    config = write_yaml(tmp_path / "s.yaml", study_config(study, strategies=[{"name": "shortgpt"}]))
    run = [sys.executable, "-m", "search.study", "run", str(config), "--no-progress"]
    done = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, preexec_fn=_full_disk(150_000))
    assert done.returncode == 2 and _error_lines(done.stderr) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "disk is full" in done.stderr
    assert study_main(["run", str(config), "--no-progress"]) == 0  # with space again, the study completes
    assert (study / "summary.md").is_file() and MODEL.is_dir()
