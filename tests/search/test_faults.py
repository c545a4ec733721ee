"""Fault injection, `run`: bad or hostile configs, paths, storage, text and models end with exit 2, one message
naming the file, key or flag and the value, and an unchanged file tree (see ``tests/faults.py``)."""

from __future__ import annotations

import os
import sqlite3

import pytest

from search.study import main as study_main
from tests.faults import PWNED, TEXT, model_copy, refused, remote_code_model, study_config, write_yaml

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))

# raw config files: (content, expected message parts)
RAW = {
    "empty file": (b"", "the file is empty"),
    "top-level list": (b"- a\n- b\n", "expected a mapping at the top level, got list"),
    "latin-1 bytes": ("model: {name: caf\xe9}\n".encode("latin-1"), ["not UTF-8 text", "byte 0xe9 at line 1"]),
    "binary": (bytes(range(256)) * 4, "not UTF-8 text"),
    "syntax error": (b"model: {name: [unclosed\n", "not valid YAML"),
    "alias bomb": (BOMB.encode(), "more than 32 aliases"),
    "recursive alias": (b"model: &m {name: *m}\n", "expands to more than"),
    "duplicate key": (b"model: {name: a}\nmodel: {name: b}\n", "duplicate key 'model'"),
    "python tag": (f"model: !!python/object/apply:os.system ['touch {PWNED}']\n".encode(), "not valid YAML"),
    "non-string keys": (b"1: 2\n", "1: Keys should be strings (got 1)"),
    "deep nesting": (b"model: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested too deeply"),
}


@pytest.mark.parametrize("case", sorted(RAW))
def test_raw_config_refused(tmp_path, capsys, case):
    content, expected = RAW[case]
    config = tmp_path / "bad.yaml"
    config.write_bytes(content)
    expected = [expected] if isinstance(expected, str) else expected
    refused(capsys, study_main, ["run", str(config)], [str(config), *expected], tmp_path)
    assert not (tmp_path / PWNED).exists() and not os.path.exists(PWNED)


def _dir_text(tmp_path):
    (tmp_path / "textdir").mkdir()
    return {"calibration": {"files": [str(tmp_path / "textdir")]}}


def _user_sqlite(tmp_path):
    with sqlite3.connect(tmp_path / "mine.db") as conn:
        conn.execute("create table notes (body text)")
    return {"storage": f"sqlite:///{tmp_path / 'mine.db'}"}


def _corrupt_sqlite(tmp_path):
    (tmp_path / "broken.db").write_bytes(b"not a database, just bytes" * 40)
    return {"storage": f"sqlite:///{tmp_path / 'broken.db'}"}


def _user_log(tmp_path):
    (tmp_path / "notes.log").write_text("my own log lines\n", encoding="utf-8")
    return {"storage": str(tmp_path / "notes.log")}


def _out_is_file(tmp_path):
    (tmp_path / "out").write_text("a file", encoding="utf-8")
    return {}


def _out_foreign(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("years of work", encoding="utf-8")
    return {}


def _out_links_to_foreign(tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "data.csv").write_text("1,2", encoding="utf-8")
    (tmp_path / "out").symlink_to(tmp_path / "work")
    return {}


# config values: (overrides, or a function of tmp_path returning them; expected message parts)
BAD = {
    "unknown key": ({"modell": {"name": "x"}}, "modell: Extra inputs are not permitted"),
    "model odd type": ({"model": 5}, "model: Input should be a valid dictionary"),
    "strategies mapping": ({"strategies": {"name": "tpe"}}, "strategies: Input should be a valid list"),
    "no strategies": ({"strategies": []}, "strategies: at least one strategy is needed"),
    "unknown strategy": ({"strategies": [{"name": "greedy"}]}, "strategies.0.name"),
    "setting type": ({"strategies": [{"name": "tpe", "settings": {"n_trials": "many"}}]}, "strategies.0.settings"),
    "setting inf": ({"strategies": [{"name": "tpe", "settings": {"n_trials": float("inf")}}]}, "n_trials"),
    "target nan": ({"budget": {"targets": [float("nan")]}}, "budget.targets"),
    "target above 1": ({"budget": {"targets": [1.5]}}, "budget.targets"),
    "no targets": ({"budget": {"targets": []}}, "budget.targets"),
    "constraint metric": ({"budget": {"constraints": {"flops": 0.5}}}, "budget.constraints.flops"),
    "constraint inf": ({"budget": {"constraints": {"kv_cache_bytes": float("inf")}}}, "budget.constraints"),
    "start nan": ({"calibration": {"start": float("nan")}}, "calibration.start"),
    "start after end": ({"calibration": {"start": 0.9, "end": 0.1}}, "calibration: slice start=0.9"),
    "negative sequences": ({"calibration": {"num_sequences": -1}}, "calibration.num_sequences"),
    "seq_len 1": ({"calibration": {"seq_len": 1}}, "calibration.seq_len"),
    "negative seed": ({"seed": -1}, "seed: Input should be greater than or equal to 0 (got -1)"),
    "huge seed": ({"seed": 2**40}, "seed: Input should be less than or equal to"),
    "zero threads": ({"model": {"threads": 0}}, "model.threads"),
    "huge threads": ({"model": {"threads": 10**6}}, "model.threads"),
    "objective": ({"objective": "mse"}, "objective: Input should be 'kl', 'js' or 'ppl' (got 'mse')"),
    "dtype": ({"model": {"dtype": "float8"}}, "model.dtype"),
    "text missing": ({"calibration": {"files": ["/no/such.txt"]}}, "calibration.files.0: text file not found"),
    "text is a directory": (_dir_text, "calibration.files.0: is a directory"),
    "model missing": ({"model": {"name": "/no/such/model"}}, "model.name: model path '/no/such/model' does not exist"),
    "model is a file": ({"model": {"name": str(TEXT)}}, "model.name"),
    "device name": ({"model": {"device": "gpu-please"}}, "model.device: not a device name; use auto, cpu, cuda"),
    "device type": ({"model": {"device": "meta"}}, "model.device: device type 'meta' is not supported"),
    "latency key": ({"latency": {"bogus": 1}}, "latency.bogus"),
    "confirm value": ({"confirm": {"top_k": 0}}, "confirm.top_k"),
    "storage word": ({"storage": "database"}, "storage: expected an Optuna storage URL"),
    "storage dir missing": ({"storage": "sqlite:////no/such/dir/s.db"}, "the directory /no/such/dir does not exist"),
    "storage in memory": ({"storage": "sqlite:///:memory:"}, "in-memory SQLite database"),
    "storage unreachable": ({"storage": "postgresql://me:secret@127.0.0.1:1/db"},
                            "cannot connect to postgresql://me:***@"),
    "storage scheme": ({"storage": "nosuch://host/db"}, "storage: cannot connect to nosuch://host/db"),
    "storage foreign sqlite": (_user_sqlite, "an SQLite database of something else (tables notes)"),
    "storage corrupt sqlite": (_corrupt_sqlite, "not a readable SQLite database"),
    "storage foreign log": (_user_log, "is not an Optuna journal file"),
    "output is a file": (_out_is_file, "exists and is not a directory"),
    "output foreign": (_out_foreign, "is not a depthsearch study directory (holds thesis.tex)"),
    "output links to foreign": (_out_links_to_foreign, "is not a depthsearch study directory (holds data.csv)"),
    "text is a device": ({"calibration": {"files": ["/dev/zero"]}}, "calibration.files.0: not a regular file"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_refused(tmp_path, capsys, case):
    overrides, expected = BAD[case]
    overrides = overrides(tmp_path) if callable(overrides) else overrides
    config = write_yaml(tmp_path / "bad.yaml", study_config(tmp_path / "out", **overrides))
    err = refused(capsys, study_main, ["run", str(config), "--no-progress"], [str(config), expected], tmp_path)
    assert "secret" not in err


def test_empty_output_dir_means_the_working_directory_and_is_refused_there(tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine", encoding="utf-8")
    monkeypatch.chdir(work)
    config = write_yaml(tmp_path / "c.yaml", study_config(tmp_path / "unused"))
    refused(capsys, study_main, ["run", str(config), "--output-dir", ""], "not a depthsearch study directory",
            tmp_path)


@pytest.mark.parametrize("argv, expected", [
    (["run"], "the following arguments are required: config"),
    (["run", "x.yaml", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["nosuch"], "invalid choice: 'nosuch'"),
    (["run", "/no/such/config.yaml"], "config file not found: /no/such/config.yaml"),
    (["run", "/"], "/: is a directory, not a YAML config file"),
    (["run", "/dev/null"], "/dev/null: not a regular file"),
])
def test_bad_command_line_refused(tmp_path, capsys, argv, expected):
    refused(capsys, study_main, argv, expected, tmp_path)


# inputs only the model or the text reveal ------------------------------------------------------------------
def _text(tmp_path, name: str, content: bytes) -> dict:
    (tmp_path / name).write_bytes(content)
    return {"calibration": {"files": [str(tmp_path / name)], "end": 1.0}}


TEXTS = {
    "latin-1 text": ("cal.txt", "Once upon a time.\nThe caf\xe9 was open.\n".encode("latin-1"),
                     ["cal.txt: not UTF-8 text (byte 0xe9 at line 2, column 8)"]),
    "binary text": ("cal.txt", b"weights\x00\x01\x02" * 100, ["cal.txt: line 1 holds a NUL byte"]),
    "broken json line": ("cal.jsonl", b'{"text": "a"}\n{"text": "b"\n', ["cal.jsonl: line 2 is not valid JSON"]),
    "json row not object": ("cal.jsonl", b'{"text": "a"}\n[1, 2]\n', ["cal.jsonl: line 2: expected a JSON object"]),
    "json field missing": ("cal.jsonl", b'{"text": "a"}\n\n{"body": "b"}\n', ["cal.jsonl: line 3 has no field 'text'"]),
    "json field not text": ("cal.jsonl", b'{"text": 5}\n', ["cal.jsonl: line 1: field 'text' is int"]),
    "empty text": ("cal.txt", b"\n\n  \n", ["calibration: no text in"]),
    "too little text": ("cal.txt", b"Once upon a time.", ["too few for 2 sequences of 32 tokens"]),
}


@pytest.mark.parametrize("case", sorted(TEXTS))
def test_bad_text_refused(tmp_path, capsys, case):
    name, content, expected = TEXTS[case]
    config = write_yaml(tmp_path / "c.yaml", study_config(tmp_path / "out", **_text(tmp_path, name, content)))
    refused(capsys, study_main, ["run", str(config), "--no-progress"], [str(config), *expected], tmp_path)


MODELS = {
    "broken config.json": (lambda p: (p / "config.json").write_text("{bad json"), "not a readable JSON model config"),
    "truncated weights": (lambda p: (p / "model.safetensors").write_bytes(b"\x00" * 100), "cannot load model"),
    "no decoder layers": (lambda p: (p / "config.json").write_text((p / "config.json").read_text().replace(
        '"num_hidden_layers": 5', '"num_hidden_layers": 0')), "no decoder layers"),
    "no weights": (lambda p: (p / "model.safetensors").unlink(), "cannot load model"),
}


@pytest.mark.parametrize("case", sorted(MODELS))
def test_broken_model_refused(tmp_path, capsys, case):
    breaking, expected = MODELS[case]
    model = model_copy(tmp_path)
    breaking(model)
    config = write_yaml(tmp_path / "c.yaml", study_config(tmp_path / "out", model={"name": str(model)}))
    refused(capsys, study_main, ["run", str(config), "--no-progress"], expected, tmp_path)


def test_model_code_is_not_run_without_permission(tmp_path, capsys):
    model = remote_code_model(tmp_path)
    config = write_yaml(tmp_path / "c.yaml", study_config(tmp_path / "out", model={"name": str(model)}))
    refused(capsys, study_main, ["run", str(config)], ["ships its own Python code", "model.trust_remote_code"],
            tmp_path)
    refused(capsys, study_main, ["run", str(config), "--dry-run"], "ships its own Python code", tmp_path)
    assert not (tmp_path / PWNED).exists()


@pytest.mark.parametrize("overrides, expected", [
    ({"calibration": {"seq_len": 4096, "num_sequences": 1}}, "calibration.seq_len: 4096 tokens exceed the 512"),
    ({"budget": {"targets": [0.95]}}, "budget.targets.0"),
    ({"heldout": {"start": 0.5}}, "overlaps calibration text"),
])
def test_model_dependent_problems_refused(tmp_path, capsys, overrides, expected):
    config = write_yaml(tmp_path / "c.yaml", study_config(tmp_path / "out", **overrides))
    refused(capsys, study_main, ["run", str(config), "--no-progress"], [str(config), expected], tmp_path)
