"""benchmarks/oracle_study.py: the shipped study's config, calibrated on the given text with perplexity, run for real."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import optuna
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "oracle_study.py"
TEXT = ROOT / "studies" / "assets" / "text" / "tinystories_train_head.txt"
STUDY = ROOT / "studies" / "stories260k.yaml"


def load_script():
    spec = importlib.util.spec_from_file_location("oracle_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_oracle_study_calibrates_on_the_given_text_and_runs(tmp_path):
    out = tmp_path / "oracle"
    args = ["--study", str(STUDY), "--text", str(TEXT), "--out", str(out), "--targets", "0.2",
            "--sequences", "2", "--seq-len", "32"]
    assert load_script().main(args) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["calibration"]["files"] == [str(TEXT)] and config["objective"] == "ppl"
    assert config["budget"]["targets"] == [0.2] and not config.get("extra_calibration")
    assert [s["name"] for s in config["strategies"]] == ["sleb", "greedy_per_cost", "evolutionary"]
    attrs = optuna.load_study(study_name="depthsearch", storage=f"sqlite:///{out / 'study.db'}").user_attrs
    for tag in ("sleb", "greedy_per_cost", "evolutionary"):
        assert attrs[f"strategy:{tag}"]["results"]["0.2"]  # each found a mask at the target
    assert load_script().main(args) == 0  # a re-run resumes the same study


def test_oracle_study_refuses_a_missing_text_and_other_settings(tmp_path, capfd):
    script = load_script()
    out = tmp_path / "oracle"
    assert script.main(["--text", str(tmp_path / "nope.txt"), "--out", str(out)]) == 2
    assert "not a file" in capfd.readouterr().err and not out.with_suffix(".yaml").exists()
    args = ["--study", str(STUDY), "--text", str(TEXT), "--out", str(out), "--targets", "0.99"]
    assert script.main(args) == 2  # the study refuses the budget: its config is not left behind
    assert "budget.targets.0: params target 99%" in capfd.readouterr().err
    assert not out.with_suffix(".yaml").exists() and not out.exists()
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: {}\n")
    assert script.main(["--study", str(broken), "--text", str(TEXT), "--out", str(out)]) == 2
    assert "model.name" in capfd.readouterr().err and not out.with_suffix(".yaml").exists()
    out.with_suffix(".yaml").write_text("mine: true\n")
    assert script.main(["--study", str(STUDY), "--text", str(TEXT), "--out", str(out)]) == 2
    assert "exists with other settings" in capfd.readouterr().err
    assert out.with_suffix(".yaml").read_text() == "mine: true\n"  # the user's file is kept
