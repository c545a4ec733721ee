"""Inputs checked by content, and a dry run that checks what run checks: held-out text that is calibration text
under another name, `bench` against a model that is not the export's own, and a dry run on a device or a stored
study that `run` would refuse, each end with one message, exit 2 and nothing written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from search.study import main as study_main
from tests.faults import MODEL, TEXT, model_copy, refused, study_config, write_yaml
from tests.families import tiny_model


def _copy(tmp_path, name="copy.txt"):
    return str(shutil.copy(TEXT, tmp_path / name))


def _calibration_slice(tmp_path):
    text = TEXT.read_text(encoding="utf-8")
    (tmp_path / "slice.txt").write_text(text[:int(len(text) * 0.8)], encoding="utf-8")
    return str(tmp_path / "slice.txt")


TEXTS = {  # overrides of the study config (a function of tmp_path), the key the message names
    "held-out copy, overlapping slice": (lambda t: {"heldout": {"files": [_copy(t)], "start": 0.5}}, "heldout:"),
    "held-out copy, whole file": (lambda t: {"heldout": {"files": [_copy(t)], "start": 0.0}}, "heldout:"),
    "extra held-out copy": (lambda t: {"extra_heldout": {"more": {"files": [_copy(t)], "end": 0.3}}},
                            "extra_heldout.more:"),
    "held-out file holding the calibration slice": (lambda t: {"heldout": {"files": [_calibration_slice(t)],
                                                                           "start": 0.0}}, "heldout:"),
    "extra calibration copy of the held-out text": (
        lambda t: {"extra_calibration": {"more": {"files": [_copy(t)], "start": 0.9, "num_sequences": 2,
                                                  "seq_len": 32}}}, "overlaps extra_calibration.more text"),
}


@pytest.mark.parametrize("case", sorted(TEXTS))
def test_held_out_text_compared_by_content(tmp_path, capsys, case):
    overrides, key = TEXTS[case]
    config = write_yaml(tmp_path / "c.yaml", study_config(tmp_path / "out", **overrides(tmp_path)))
    for argv in (["run", str(config), "--no-progress"], ["run", str(config), "--dry-run"]):
        refused(capsys, study_main, argv, [key, "overlaps", "calibration"], tmp_path)


def test_a_copy_with_disjoint_slices_is_fine(tmp_path, capsys):
    config = write_yaml(tmp_path / "c.yaml", study_config(tmp_path / "out", heldout={"files": [_copy(tmp_path)]}))
    assert study_main(["run", str(config), "--dry-run"]) == 0, capsys.readouterr().err


def _other_family(tmp_path):
    target = tmp_path / "other"
    tiny_model("qwen2").save_pretrained(target)
    shutil.copy(MODEL / "tokenizer.json", target)
    shutil.copy(MODEL / "tokenizer_config.json", target)
    return target


AGAINST = {  # a model that is not the export's dense one: (maker, expected)
    "another vocabulary": (lambda t: model_copy(t, "m", lambda c: c.update(vocab_size=c["vocab_size"] * 2)),
                           "vocab_size"),
    "other widths": (lambda t: model_copy(t, "m", lambda c: c.update(hidden_size=128, intermediate_size=256)),
                     "hidden_size 128"),
    "fewer layers than the export": (lambda t: model_copy(t, "m", lambda c: c.update(num_hidden_layers=2)),
                                     "2 layers, fewer than the 5"),
    "another family": (_other_family, "a qwen2 model, but"),
}


@pytest.mark.parametrize("case", sorted(AGAINST))
def test_bench_refuses_a_reference_that_is_not_the_exports_own(tmp_path, capsys, case):
    make, expected = AGAINST[case]
    against = make(tmp_path)
    capsys.readouterr()  # the maker's progress bars
    refused(capsys, study_main, ["bench", str(MODEL), "--against", str(against)], ["--against", expected],
            tmp_path, MODEL)


DEVICES = ["cuda:7", "cuda", "mps", "xpu:0"]


@pytest.mark.parametrize("device", DEVICES)
def test_dry_run_refuses_a_device_run_would_refuse(tmp_path, capsys, device):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that many CUDA devices")
    config = write_yaml(tmp_path / "c.yaml", study_config(tmp_path / "out", model={"device": device}))
    run_err = refused(capsys, study_main, ["run", str(config)], "model.device", tmp_path)
    dry_err = refused(capsys, study_main, ["run", str(config), "--dry-run"], "model.device", tmp_path)
    assert dry_err == run_err


def test_dry_run_checks_the_stored_study_and_says_what_it_did_not_check(tmp_path, capsys):
    out = tmp_path / "out"
    config = write_yaml(tmp_path / "c.yaml", study_config(out, strategies=[{"name": "shortgpt"}]))
    assert study_main(["run", str(config), "--no-progress"]) == 0
    capsys.readouterr()
    assert study_main(["run", str(config), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "not checked: the weights themselves" in plan and "(exists: re-running resumes it)" in plan
    other = write_yaml(tmp_path / "o.yaml", study_config(out, strategies=[{"name": "shortgpt"}], seed=3))
    refused(capsys, study_main, ["run", str(other), "--dry-run"], "seed: the study has 0, now 3", tmp_path)


@pytest.mark.parametrize("url", ["database", "postgres:/host/db", "sqlite:/relative.db", "my-study.db"])
def test_a_malformed_storage_url_is_one_problem(tmp_path, capsys, url):
    config = write_yaml(tmp_path / "c.yaml", study_config(tmp_path / "out", storage=url))
    for argv in (["run", str(config)], ["run", str(config), "--dry-run"]):
        refused(capsys, study_main, argv, ["1 problem(s)", f"storage: expected an Optuna storage URL", repr(url)],
                tmp_path)


@pytest.mark.slow  # lm-eval's task index takes minutes to build
@pytest.mark.parametrize("task", ["hub:arc_easy", "sciq"])  # lm-eval's own copies, not the local ones
def test_confirm_with_a_hub_task_that_cannot_load_here_writes_nothing(tmp_path, capsys, task):
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    config = write_yaml(tmp_path / "c.yaml", study_config(out, strategies=[{"name": "shortgpt"}]))
    assert study_main(["run", str(config), "--no-progress"]) == 0
    before = sorted(p.name for p in out.iterdir())
    offline = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-m", "search.study", "confirm", str(out), "--tasks", task, "--no-progress"],
                          cwd=Path(__file__).resolve().parents[2], env=offline, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"benchmark task {task!r}: cannot load its data" in errors[0]
    assert sorted(p.name for p in out.iterdir()) == before  # no confirm/
