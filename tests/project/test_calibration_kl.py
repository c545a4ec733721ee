"""benchmarks/calibration_kl.py re-scores a study's result masks; on the study's own sample it reproduces them."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from tests.search.test_study_cli import run_study

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "calibration_kl.py"


def load_script():
    spec = importlib.util.spec_from_file_location("calibration_kl", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rescoring_on_the_study_sample_reproduces_the_study_values(tmp_path, capsys):
    out = run_study(tmp_path, strategies=[{"name": "sleb"}, {"name": "greedy_per_cost"}])
    assert load_script().main([str(out), "--sequences", "2", "--seed", "0"]) == 0
    text = capsys.readouterr().out
    assert "## 0.2 removed: kl on 2 x 32 tokens" in text and "## 0.4 removed" in text
    rows = [line.split("|")[1:-1] for line in text.splitlines() if re.match(r"\| (sleb|greedy_per_cost)", line)]
    assert len(rows) >= 2
    for cells in rows:
        study_value, rescored = float(cells[1]), float(cells[2])
        assert abs(rescored - study_value) <= 1e-3 * max(1.0, study_value), cells
