"""Every benchmark script runs: ``python benchmarks/<name>.py --smoke`` exits 0 and prints a markdown table.

The convention, for every ``benchmarks/*.py`` (found by glob, so a new script is covered without editing this file):
- it is a script with a ``--smoke`` flag: a tiny model (a bundled one, or a random one of a few layers), one
  repeat, a few seconds; sizes given on the command line are replaced by the smoke sizes, paths are kept, and
  inputs it needs but was not given have smoke defaults (a temporary directory for what it writes);
- its result is a markdown table on stdout (a ``| ... |`` header row followed by a ``|---|`` row);
- a smoke run that cannot run on this machine (it needs something the repository does not ship) exits 77 with
  ``skip: <reason>`` as its last line on stderr; the test then skips with that reason, except under ``CI``.
The scripts run side by side in subprocesses (real models, no mocks), once per session.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))
SKIP_CODE = 77
TIMEOUT_S = 600
TABLE = re.compile(r"^\|.*\|\n\|(\s*:?-+:?\s*\|)+$", re.MULTILINE)


def script_env() -> dict[str, str]:
    """The environment of a command run by the tests: offline, this interpreter's ``bin`` first on PATH."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, float]]:
    """script name -> (its finished ``--smoke`` run, wall seconds); every script started at once."""
    cwd = tmp_path_factory.mktemp("smoke")
    started = {p.name: (subprocess.Popen([sys.executable, str(p), "--smoke"], cwd=cwd, env=script_env(), text=True,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE), time.perf_counter())
               for p in SCRIPTS}
    runs = {}
    for name, (process, start) in started.items():
        try:
            out, err = process.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        runs[name] = (subprocess.CompletedProcess(process.args, process.returncode, out, err),
                      time.perf_counter() - start)
    return runs


def skip_reason(run: subprocess.CompletedProcess) -> str | None:
    """The reason a smoke run gave for skipping (exit 77, last stderr line ``skip: ...``), else None."""
    lines = run.stderr.strip().splitlines()
    if run.returncode == SKIP_CODE and lines and lines[-1].startswith("skip: "):
        return lines[-1][len("skip: "):]
    return None


def test_the_benchmark_scripts_are_found():
    assert {"greedy_engine.py", "latency.py", "independent_ppl.py", "oracle_study.py", "calibration_kl.py",
            "smollm2.py"} <= {p.name for p in SCRIPTS}


@pytest.mark.parametrize("script", [p.name for p in SCRIPTS])
def test_smoke_run_prints_its_table(script, smoke_runs):
    run, wall = smoke_runs[script]
    reason = skip_reason(run)
    if reason and not os.environ.get("CI"):
        pytest.skip(reason)
    assert "--smoke" in (ROOT / "benchmarks" / script).read_text(encoding="utf-8"), f"{script} has no --smoke mode"
    assert run.returncode == 0, f"{script} --smoke exited {run.returncode} after {wall:.0f} s:\n{run.stderr[-4000:]}"
    assert TABLE.search(run.stdout), f"{script} --smoke printed no markdown table:\n{run.stdout[-2000:]}"


def _output_flags() -> list[tuple[str, str, str]]:
    """(script, flag, kind) for every flag a benchmark script writes to, by its argparse type."""
    found = []
    for path in SCRIPTS:
        for flag, kind in re.findall(r'add_argument\("(--[a-z-]+)", type=(output_file|output_dir)', path.read_text()):
            found.append((path.name, flag, kind))
    return found


@pytest.mark.parametrize("script, flag, kind", _output_flags())
def test_output_paths_that_cannot_be_written_are_one_message_and_exit_2(script, flag, kind, tmp_path):
    """A folder where a file goes (or a file where a folder goes), an empty name, a place that cannot be written."""
    taken = tmp_path / ("folder" if kind == "output_file" else "file")
    taken.mkdir() if kind == "output_file" else taken.write_text("mine")
    before = sorted(p.name for p in tmp_path.iterdir())
    for value in (str(taken), "", "/proc/depthsearch-out"):
        run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), f"{flag}={value}"], cwd=tmp_path,
                             env=script_env(), capture_output=True, text=True, timeout=120)
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and flag in lines[0], run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert taken.is_dir() if kind == "output_file" else taken.read_text() == "mine"


def test_repair_benchmark_fits_on_a_study_config_and_scores_its_validation_text(tmp_path, capsys):
    """``benchmarks/repair.py --config``: the study's calibration parts fit, its validation parts are scored, one
    repaired row per ``--ridge``; a study without validation text is refused."""
    import importlib.util

    from tests.search.test_selection import VALIDATION
    from tests.search.test_study_cli import study_config, write_config

    spec = importlib.util.spec_from_file_location("repair_benchmark", ROOT / "benchmarks" / "repair.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    config = write_config(tmp_path / "study.yaml", study_config(tmp_path / "out", calibration={"end": 0.6},
                                                                validation=VALIDATION))
    masks = tmp_path / "masks.csv"
    masks.write_text('target,mask\n0.3,"AM,-M,A-,--,AM"\n', encoding="utf-8")
    flags = ["--masks", str(masks), "--sequences", "2", "--windows", "2", "--ridge", "1e-3", "--ridge", "1"]
    assert script.main(["--config", str(config), *flags]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()]
    assert rows[0][:4] == ["| model", "mask", "stories", "wiki"]
    assert [row[:2] for row in rows[2:]] == [["| dense", "-"], ["| pruned", "0.3"], ["| repaired (ridge 0.001)", "0.3"],
                                             ["| repaired (ridge 1)", "0.3"]]
    plain = write_config(tmp_path / "plain.yaml", study_config(tmp_path / "out"))
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--config", str(plain), *flags])
    assert exit_info.value.code == 2 and "has no validation text" in capsys.readouterr().err
