"""Study configs: every shipped config validates (dry run); bad values are reported with file, key and value."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from search.config import ConfigError, check_config, load_config, model_source
from search.storage import open_storage, storage_url
from search.study import main as study_main

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "studies").glob("*.yaml"))


def test_shipped_configs_exist():
    names = {p.name for p in SHIPPED}
    assert {"stories260k.yaml", "tinystories-l12.yaml", "llama3-8b.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_starts_with_its_command(path):
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first == f"# python -m search.study run studies/{path.name}"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_validates_with_dry_run(path, tmp_path, capsys):
    from search.checks import device_problem

    out = tmp_path / "out"
    missing = device_problem("model.device", load_config(path).model.device)
    code = study_main(["run", str(path), "--dry-run", "--output-dir", str(out)])
    if missing:  # a config for a GPU machine: the dry run refuses it here, as run would
        assert code == 2 and "model.device" in capsys.readouterr().err and not out.exists()
        return
    assert code == 0
    plan = capsys.readouterr().out
    assert "valid" in plan.splitlines()[0]
    assert not out.exists()


def test_stories260k_plan_numbers(capsys, tmp_path):
    assert study_main(["run", str(ROOT / "studies" / "stories260k.yaml"), "--dry-run",
                       "--output-dir", str(tmp_path / "o")]) == 0
    plan = capsys.readouterr().out
    assert "dense params: 260032 parameters; 5 layers, 2^10 masks" in plan
    assert "target 50.0%: params <= 130016" in plan
    for name in ("exhaustive", "greedy_finercut", "blockpruner", "sleb", "gromov", "shortgpt", "shortened_llama",
                 "evolutionary", "tpe", "nsga2", "random"):
        assert f"strategy {name}:" in plan


def test_relative_paths_resolve_against_the_config_file():
    config = load_config(ROOT / "studies" / "stories260k.yaml")
    name, local = model_source(config)
    assert local and Path(name).resolve() == (ROOT / "studies/assets/models/stories260k").resolve()


def test_hub_id_is_not_a_path():
    config = load_config(ROOT / "studies" / "llama3-8b.yaml")
    assert model_source(config) == ("meta-llama/Meta-Llama-3-8B", False)


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _base() -> dict:
    return yaml.safe_load((ROOT / "studies" / "stories260k.yaml").read_text(encoding="utf-8"))


def test_type_errors_name_file_key_and_value(tmp_path):
    data = _base()
    data["calibration"]["seq_len"] = "long"
    data["objective"] = "kll"
    data["budget"]["targets"] = [0.2, 1.5]
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: 3 problem(s)")
    assert "calibration.seq_len" in message and "'long'" in message
    assert "objective" in message and "'kll'" in message
    assert "budget.targets" in message and "1.5" in message


def test_unknown_key_rejected(tmp_path):
    data = _base()
    data["budget"]["target"] = [0.1]
    with pytest.raises(ConfigError, match=r"budget.target: Extra inputs are not permitted"):
        load_config(_write(tmp_path, data))


def test_semantic_checks_collect_everything(tmp_path):
    data = _base()
    data["model"]["name"] = "./no/such/model"
    data["strategies"] = [{"name": "evolutionary", "settings": {"generationz": 3}}, {"name": "gromov"},
                          {"name": "gromov"}]
    data["budget"]["constraints"] = {"kv_cache_byte": 0.5}
    data["storage"] = "study.db"
    data["calibration"]["files"] = [str(ROOT / "studies/assets/text/tinystories_valid.txt")]
    data["heldout"]["files"] = ["missing.txt"]
    config = load_config(_write(tmp_path, data))
    with pytest.raises(ConfigError) as info:
        check_config(config)
    message = str(info.value)
    assert "6 problem(s)" in message
    for expected in ("model.name: model path './no/such/model' does not exist", "strategies.0.settings",
                     "strategies.2: tag 'gromov' used twice", "budget.constraints.kv_cache_byte",
                     "did you mean 'kv_cache_bytes'", "storage: expected an Optuna storage URL",
                     "heldout.files.0: text file not found (got 'missing.txt')"):
        assert expected in message


def test_storage_defaults_and_journal(tmp_path):
    assert storage_url(None, tmp_path) == f"sqlite:///{tmp_path / 'study.db'}"
    assert storage_url("postgresql://u@h/db", tmp_path) == "postgresql://u@h/db"
    journal = open_storage(str(tmp_path / "j.log"))
    assert type(journal).__name__ == "JournalStorage"
