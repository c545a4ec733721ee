"""Fault injection on an existing study: resume with other settings, a second process, and bad inputs to `report`,
`export`, `confirm`, `bench` and `surgery.export` end with exit 2, one message and an unchanged file tree; the
study, the source model and the user's files are never replaced."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from search.study import main as study_main
from search.studydir import StudyLock
from surgery.export import main as export_main
from tests.faults import MODEL, PWNED, model_copy, refused, remote_code_model, study_config, tree, write_yaml
from tests.search.test_study_cli import trial_table

STRATEGIES = [{"name": "shortgpt"}, {"name": "gromov"}]


def make_study(root, name="study", **overrides):
    model = root / "model" if (root / "model").exists() else model_copy(root)
    config = write_yaml(root / f"{name}.yaml", study_config(root / name, strategies=STRATEGIES,
                                                              model={"name": str(model)}, **overrides))
    assert study_main(["run", str(config), "--no-progress"]) == 0
    return root / name, config, model


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A finished small study on a private copy of stories260k: (root, study dir, config, model)."""
    root = tmp_path_factory.mktemp("faults")
    out, config, model = make_study(root)
    return root, out, config, model


# re-running with other settings, or while another process owns the study -----------------------------------
@pytest.mark.parametrize("overrides, expected", [
    ({"calibration": {"seed": 5}}, "calibration.seed: the study has 0, now 5"),
    ({"objective": "ppl"}, "objective: the study has 'kl', now 'ppl'"),
    ({"budget": {"targets": [0.3]}}, "budget.targets"),
    ({"model": {"dtype": "bfloat16"}}, "dtype: the study has 'float32', now 'bfloat16'"),
    ({"heldout": {"num_sequences": 2}}, "heldout.num_sequences"),
    ({"strategies": [{"name": "gromov", "settings": {"last_token_only": False}}]},
     "strategies.0: 'gromov' already ran"),
])
def test_rerun_with_other_settings_refused_and_config_copy_kept(study, capsys, overrides, expected):
    root, out, _, model = study
    data = study_config(out, strategies=STRATEGIES, model={"name": str(model)})
    for key, value in overrides.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    config = write_yaml(root / "other.yaml", data)
    refused(capsys, study_main, ["run", str(config), "--no-progress"], [str(config), expected], out, model)


def test_study_keeps_its_storage(study, tmp_path, capsys):
    root, out, config, _ = study
    refused(capsys, study_main, ["run", str(config), "--storage", f"sqlite:///{tmp_path / 'other.db'}"],
            ["holds a study stored in sqlite:///", "other.db"], out, tmp_path)


def test_studies_share_a_storage_under_their_own_names(study, tmp_path, capsys):
    """A second study in the storage of the first is refused while it takes the same name (the message names the
    storage and the key to set, and nothing is written); under its own study_name both run and report apart."""
    root, _, _, model = study
    shared = f"sqlite:///{tmp_path / 'shared.db'}"
    first = write_yaml(tmp_path / "first.yaml", study_config(tmp_path / "first", strategies=STRATEGIES,
                                                             model={"name": str(model)}, storage=shared))
    assert study_main(["run", str(first), "--no-progress"]) == 0
    data = study_config(tmp_path / "second", strategies=STRATEGIES, model={"name": str(model)}, storage=shared,
                        seed=1)
    second = write_yaml(tmp_path / "second.yaml", data)
    refused(capsys, study_main, ["run", str(second), "--no-progress"],
            ["already holds a study named 'depthsearch'", "set study_name", "seed: the study has 0, now 1"],
            tmp_path)
    second = write_yaml(tmp_path / "second.yaml", {**data, "study_name": "seed-1"})
    assert study_main(["run", str(second), "--no-progress"]) == 0
    assert len(trial_table(tmp_path / "first")) == len(trial_table(tmp_path / "second", "seed-1")) > 0
    for out in ("first", "second"):
        assert study_main(["report", str(tmp_path / out)]) == 0
    renamed = write_yaml(tmp_path / "renamed.yaml", {**data, "study_name": "other"})
    refused(capsys, study_main, ["run", str(renamed), "--no-progress"],
            ["study_name: ", "holds the study 'seed-1', not 'other'"], tmp_path)


def test_same_model_by_another_path_resumes(study, capsys):
    root, out, _, model = study
    before = trial_table(out)
    other = write_yaml(root / "relative.yaml", study_config(out, strategies=STRATEGIES, model={"name": "./model"}))
    assert study_main(["run", str(other), "--no-progress"]) == 0
    pd = pytest.importorskip("pandas")
    pd.testing.assert_frame_equal(trial_table(out), before)


def test_second_process_refused_while_one_owns_the_study(study, capsys):
    root, out, config, _ = study
    with StudyLock(out, "python -m search.study run (the other one)"):
        for argv in (["run", str(config), "--no-progress"], ["report", str(out)], ["confirm", str(out)]):
            refused(capsys, study_main, argv, [f"{out} is in use by `python -m search.study run (the other one)`",
                                               "pid"], out)


def test_new_weights_at_the_same_path_refused(tmp_path, capsys):
    out, config, model = make_study(tmp_path)
    weights = load_file(model / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1e-3
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    refused(capsys, study_main, ["run", str(config), "--no-progress"], ["model.sha256: the study has"], tmp_path)
    refused(capsys, study_main, ["export", str(out), "--max-removed", "4", "--out", str(tmp_path / "e")],
            "changed since the study ran", tmp_path)


# report ----------------------------------------------------------------------------------------------------
def _copy(study, tmp_path, edit):
    """A copy of the study directory, broken by ``edit(copy)``."""
    copy = tmp_path / "copy"
    shutil.copytree(study[1], copy)
    edit(copy)
    return copy


def _trust(copy):
    data = yaml.safe_load((copy / "config.yaml").read_text())
    data["model"]["trust_remote_code"] = True
    (copy / "config.yaml").write_text(yaml.safe_dump(data))


BROKEN_DIRS = {
    "corrupt study.db": (lambda c: (c / "study.db").write_bytes(b"\x00garbage" * 64), "not a readable SQLite database"),
    "no study.db": (lambda c: (c / "study.db").unlink(), "study.db does not exist"),
    "garbage config.yaml": (lambda c: (c / "config.yaml").write_text("model: [1, 2"), "config.yaml: not valid YAML"),
    "config.yaml is binary": (lambda c: (c / "config.yaml").write_bytes(b"\xff\xfe\x00"), "not UTF-8 text"),
    "no config.yaml": (lambda c: (c / "config.yaml").unlink(), "no config.yaml"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_DIRS))
@pytest.mark.parametrize("command", ["report", "export", "confirm"])
def test_broken_study_dir_refused(study, tmp_path, capsys, case, command):
    edit, expected = BROKEN_DIRS[case]
    copy = _copy(study, tmp_path, edit)
    extra = {"export": ["--max-removed", "4", "--out", str(tmp_path / "e")], "confirm": [], "report": []}[command]
    refused(capsys, study_main, [command, str(copy), *extra], expected, tmp_path)


@pytest.mark.parametrize("path, expected", [("missing", "it does not exist"), ("file", "not a directory"),
                                             ("empty", "no config.yaml")])
def test_not_a_study_refused(tmp_path, capsys, path, expected):
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    for command in ("report", "confirm"):
        refused(capsys, study_main, [command, str(tmp_path / path)], expected, tmp_path)


# export ----------------------------------------------------------------------------------------------------
def _export(out, target, *extra):
    return ["export", str(out), "--max-removed", "4", "--out", str(target), *extra]


def test_export_never_replaces_what_it_did_not_write(study, tmp_path, capsys):
    root, out, _, model = study
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    cases = [
        (out, "is or holds the study"), (model, "is or holds the source model"), (root, "is or holds the study"),
        (mine, "not written by a depthsearch export"),
    ]
    for target, expected in cases:
        refused(capsys, study_main, _export(out, target, "--force"), expected, root, tmp_path)
    link = tmp_path / "link"
    link.symlink_to(mine)
    refused(capsys, study_main, _export(out, link, "--force"), "is a symbolic link", root, tmp_path)
    refused(capsys, study_main, _export(out, mine), "exists and is not empty", root, tmp_path)


def test_force_replaces_a_previous_export_only_while_it_holds_nothing_else(study, tmp_path, capsys):
    _, out, _, _ = study
    target = tmp_path / "export"
    assert study_main(_export(out, target)) == 0
    leftover = tmp_path / ".export.tmp-999999999-abc"  # staging of a killed export (no such process)
    leftover.mkdir()
    assert study_main(_export(out, target, "--force")) == 0
    assert not leftover.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    (target / "added.txt").write_text("the user's")
    refused(capsys, study_main, _export(out, target, "--force"), "holds files the export did not write (added.txt)",
            tmp_path)


@pytest.mark.parametrize("flags, expected", [
    (["--max-removed", "nan"], "argument --max-removed: expected a finite number > 0, got 'nan'"),
    (["--max-removed", "-1"], "argument --max-removed"),
    (["--max-params", "0"], "argument --max-params"),
    (["--max-params", "inf"], "argument --max-params"),
    (["--max-removed", "99"], "--max-removed 99: a count must be a whole number <= 10"),
    (["--max-params", "10"], "no evaluated mask has at most 10 parameters"),
    (["--max-removed", "4", "--objective", "best"], "argument --objective: invalid choice"),
    (["--max-removed", "4", "--bogus"], "unrecognized arguments: --bogus"),
    (["--max-removed", "4", "--max-params", "5"], "not allowed with argument"),
])
def test_export_bad_flags_refused(study, tmp_path, capsys, flags, expected):
    _, out, _, _ = study
    refused(capsys, study_main, ["export", str(out), "--out", str(tmp_path / "e"), *flags], expected, tmp_path, out)


def test_study_config_does_not_permit_model_code(study, tmp_path, capsys):
    copy = _copy(study, tmp_path, _trust)
    for command in (_export(copy, tmp_path / "e"), ["confirm", str(copy)]):
        refused(capsys, study_main, command, ["sets model.trust_remote_code: true", "--trust-remote-code"], tmp_path)


# surgery.export --------------------------------------------------------------------------------------------
def test_surgery_export_refuses_the_source_model_and_foreign_code(tmp_path, capsys):
    model = model_copy(tmp_path)
    mask = ["--mask", "AM,AM,AM,AM,--"]
    for target, expected in [(model, "is or holds the source model"), (tmp_path, "is or holds the source model")]:
        refused(capsys, export_main, ["--model", str(model), "--out", str(target), "--force", *mask], expected,
                tmp_path)
    (tmp_path / "file").write_text("x")
    refused(capsys, export_main, ["--model", str(model), "--out", str(tmp_path / "file"), *mask],
            "exists and is not a directory", tmp_path)
    remote = remote_code_model(tmp_path)
    refused(capsys, export_main, ["--model", str(remote), "--out", str(tmp_path / "o"), *mask],
            "ships its own Python code", tmp_path)
    (model / "model.safetensors").write_bytes(b"\x00" * 64)
    refused(capsys, export_main, ["--model", str(model), "--out", str(tmp_path / "o"), *mask], "cannot load model",
            tmp_path)
    refused(capsys, export_main, ["--model", str(model), "--out", str(tmp_path / "o"), "--mask", "AM,XY"],
            "bad mask item 'XY' at layer 1", tmp_path)
    refused(capsys, export_main, ["--model", str(model), "--out", str(tmp_path / "o"), "--mask", "--,AM,AM,AM,AM"],
            "a mask \"--,AM\", is written --flag=value", tmp_path)
    assert not (tmp_path / PWNED).exists()


# bench -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, expected", [
    (["--batch-size", "0"], "argument --batch-size: expected a whole number >= 1, got '0'"),
    (["--repeats", "many"], "argument --repeats"),
    (["--warmup", "-1"], "argument --warmup"),
    (["--seq-len", "100000"], "--seq-len: 100000 tokens exceed the 512 positions"),
    (["--context", "600"], "--context (+1 decoded token): 601 tokens exceed the 512 positions"),
    (["--device", "cuda:99"], "--device"),
    (["--json", "."], "--json .: is a directory"),
])
def test_bench_bad_flags_refused(tmp_path, capsys, flags, expected):
    argv = ["bench", str(MODEL), "--against", str(MODEL), *flags]
    refused(capsys, study_main, argv, expected, tmp_path, MODEL)


def test_bench_does_not_run_model_code(tmp_path, capsys):
    remote = remote_code_model(tmp_path)
    refused(capsys, study_main, ["bench", str(remote), "--against", str(MODEL)],
            ["ships its own Python code", "--trust-remote-code"], tmp_path)
    refused(capsys, study_main, ["bench", str(tmp_path / "nope"), "--against", str(MODEL)], "nope", tmp_path)
    assert not (tmp_path / PWNED).exists()


# confirm ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, expected", [
    (["--top", "0"], "argument --top: expected a whole number >= 1, got '0'"),
    (["--budgets", "1.5"], "argument --budgets: expected a fraction in (0, 1), got '1.5'"),
    (["--limit", "-3"], "argument --limit"),
    (["--budgets", "0.9"], "--budgets 0.9: no front mask removes >= 90%"),
    pytest.param(["--tasks", "no_such_task_xyz"], "no_such_task_xyz", marks=pytest.mark.slow),  # lm-eval's index
    (["--config", "/no/such.yaml"], "config file not found: /no/such.yaml"),
])
def test_confirm_bad_flags_refused(study, tmp_path, capsys, flags, expected):
    _, out, _, _ = study
    refused(capsys, study_main, ["confirm", str(out), *flags], expected, tmp_path, out)
    assert not (out / "confirm").exists()


def test_temporaries_of_a_killed_writer_are_removed(study, tmp_path):
    copy = _copy(study, tmp_path, lambda c: None)
    (copy / ".trials.999999999.tmp.csv").write_text("half a table")  # from a report killed mid-write
    (copy / ".notes.txt").write_text("the user's own hidden file")
    assert study_main(["report", str(copy)]) == 0
    assert not (copy / ".trials.999999999.tmp.csv").exists() and (copy / ".notes.txt").is_file()


def test_refusals_leave_the_study_usable(study, tmp_path):
    _, out, _, _ = study
    before = tree(out)
    assert study_main(["report", str(out)]) == 0
    assert set(tree(out)) == set(before)  # the report rewrote its own files and added none
    assert torch.isfinite(torch.tensor(trial_table(out).objective.to_numpy())).all()
