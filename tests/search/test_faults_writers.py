"""Many writers, one storage: a study is written by one live run at a time, whatever directory each runs from.

A second run is refused with one message naming the holder (its pid, host and output directory) and writes
nothing; a dead holder's claim is taken over (same host: its process is gone; another host: no heartbeat) and the
study resumes from any directory with no duplicated trial. Real processes on SQLite, a journal file and a
PostgreSQL server the tests start themselves (``tests/postgres.py``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest

from search.record import OWNER_SUFFIX, StudyInUseError, open_record
from search.stored import STALE_S
from search.writers import TAKEN_OVER, writer_claim, writer_problem
from search.study import main as study_main
from tests import postgres
from tests.faults import refused, study_config, write_yaml

ROOT = Path(__file__).resolve().parents[2]
STRATEGIES = [{"name": "shortgpt"}, {"name": "tpe", "settings": {"n_trials": 30, "n_startup_trials": 5, "seed": 0}}]


@pytest.fixture(scope="module")
def pg_server():
    with postgres.server() as url:
        yield url


def _storage(kind: str, tmp_path: Path, request) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    if kind == "journal":
        return str(tmp_path / "shared.log")
    return postgres.fresh_database(request.getfixturevalue("pg_server"))


KINDS = ["sqlite", "journal", "postgresql"]


def _holder(url: str) -> subprocess.Popen:
    """Another process holding the writer claim on the study in ``url`` until it is killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from search.record import open_record
        from search.writers import writer_claim
        with writer_claim(open_record({url!r}), "the holder", "/elsewhere"):
            print("holding", flush=True)
            time.sleep(600)
    """)
    process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "holding"
    return process


def _plant(url: str, **attrs) -> None:
    """A claim as another host's run would leave it (fault injection)."""
    owner = optuna.create_study(study_name="depthsearch" + OWNER_SUFFIX, storage=open_record(url).storage,
                                load_if_exists=True)
    claim = {"token": "planted", "command": "the remote run", "pid": 1, "host": "elsewhere.example",
             "since": "2026-01-01 00:00:00", "heartbeat": time.time(), **attrs}
    owner.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.RUNNING, user_attrs=claim))


def _claims(url: str) -> list[tuple[str, float | None]]:
    owner = optuna.load_study(study_name="depthsearch" + OWNER_SUFFIX, storage=open_record(url).storage)
    return [(t.state.name, t.value) for t in owner.get_trials(deepcopy=False)]


@pytest.mark.slow  # a holder process and a refused run: ~10 s each
@pytest.mark.parametrize("kind", KINDS)
def test_a_live_holder_refuses_every_other_run_and_a_dead_ones_claim_is_taken_over(tmp_path, capsys, kind,
                                                                                   request):
    url = _storage(kind, tmp_path, request)
    holder = _holder(url)
    try:
        work = tmp_path / "work"  # the storage beside it changes: the holder's heartbeat
        work.mkdir()
        config = write_yaml(work / "c.yaml", study_config(work / "out", storage=url))
        refused(capsys, study_main, ["run", str(config), "--no-progress"],
                ["is being written by `the holder`", f"pid {holder.pid} on {socket.gethostname()}",
                 "output_dir /elsewhere"], work)
        assert _claims(url) == [("RUNNING", None)]  # the refused run left no claim
        with pytest.raises(StudyInUseError, match="the holder"):
            with writer_claim(open_record(url), "in process"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert writer_problem(url, "depthsearch") is None  # its process is gone
    with writer_claim(open_record(url), "in process"):
        assert _claims(url)[0] == ("COMPLETE", TAKEN_OVER)
    assert {state for state, _ in _claims(url)} == {"COMPLETE"}


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_claim_from_another_host_holds_while_its_heartbeat_is_fresh(tmp_path, kind, request):
    url = _storage(kind, tmp_path, request)
    _plant(url)
    assert "`the remote run` (pid 1 on elsewhere.example" in writer_problem(url, "depthsearch")
    with pytest.raises(StudyInUseError, match="elsewhere.example"):
        with writer_claim(open_record(url), "here"):
            pass
    stale = f"sqlite:///{tmp_path / 'stale.db'}" if kind == "sqlite" else str(tmp_path / "stale.log")
    _plant(stale, heartbeat=time.time() - STALE_S - 1)
    _plant(stale, token="damaged", pid="not a pid")
    assert writer_problem(stale, "depthsearch") is None
    with writer_claim(open_record(stale), "here"):
        pass
    assert _claims(stale) == [("COMPLETE", TAKEN_OVER), ("COMPLETE", TAKEN_OVER), ("COMPLETE", 0.0)]


# whole runs, started together or one after a killed one ---------------------------------------------------
def _run(config: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "search.study", "run", str(config), "--no-progress"]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _configs(tmp_path: Path, url: str) -> list[Path]:
    return [write_yaml(tmp_path / f"{name}.yaml", study_config(tmp_path / name, strategies=STRATEGIES, storage=url))
            for name in ("a", "b")]


def _no_duplicates_and_nothing_running(url: str) -> int:
    storage = open_record(url).storage
    keys = []
    for summary in optuna.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        trials = study.get_trials(deepcopy=False)
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials), summary.study_name
        if summary.study_name == "depthsearch":
            keys = [(t.user_attrs["strategy"], t.user_attrs["target"], t.user_attrs["mask"]) for t in trials]
    assert keys and max(Counter(keys).values()) == 1, Counter(keys).most_common(3)
    return len(keys)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "journal", "postgresql"])
def test_two_runs_started_together_from_two_directories_one_writes(tmp_path, kind, request):
    url = _storage(kind, tmp_path, request)
    configs = _configs(tmp_path, url)
    processes = [_run(c) for c in configs]
    results = [(p.wait(timeout=600), *p.communicate()) for p in processes]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    winner, loser = sorted(range(2), key=lambda i: results[i][0])
    err = results[loser][2]
    assert err.count("error: ") == 1 and "Traceback" not in err, err
    assert f"is being written by `python -m search.study run` (pid {processes[winner].pid}" in err, err
    assert not (tmp_path / "ab"[loser]).exists()  # the refused run wrote nothing
    trials = _no_duplicates_and_nothing_running(url)
    assert study_main(["run", str(configs[loser]), "--no-progress"]) == 0  # then it resumes the finished study
    assert _no_duplicates_and_nothing_running(url) == trials


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "journal", "postgresql"])
def test_a_killed_writers_study_is_finished_from_another_directory(tmp_path, kind, request):
    url = _storage(kind, tmp_path, request)
    first, second = _configs(tmp_path, url)
    process = _run(first)
    deadline, record = time.time() + 300, None
    while time.time() < deadline and process.poll() is None:
        record = record or open_record(url, create=False)
        if record is not None and len(record.evaluations()) > 20:
            break
        time.sleep(0.2)
    assert process.poll() is None, process.communicate()
    os.kill(process.pid, signal.SIGKILL)
    process.communicate()
    assert study_main(["run", str(second), "--no-progress"]) == 0
    _no_duplicates_and_nothing_running(url)
