"""Bounded numbers: every number a study config holds has a range in the schema, checked before anything is
written. The cases are generated from the schema itself, so a number added later is covered too."""

from __future__ import annotations

import types
from typing import Annotated, Union, get_args, get_origin

import pytest
from pydantic import BaseModel, Field

from objectives.latency import LatencySettings
from search.commands.confirm import ConfirmSettings
from search.config import Section, StudyConfig, unbounded_numbers
from search.study import main as study_main
from tests.faults import refused, study_config, write_yaml

SCHEMAS = {"": StudyConfig, "latency.": LatencySettings, "confirm.": ConfirmSettings}


def test_every_number_in_the_config_schema_has_a_range():
    assert {prefix: unbounded_numbers(schema) for prefix, schema in SCHEMAS.items()} == dict.fromkeys(SCHEMAS, [])


def test_the_rule_finds_unbounded_numbers_wherever_they_are():
    class Inner(BaseModel):
        low_only: float = Field(1.0, ge=0)

    class Loose(BaseModel):
        plain: int = 1
        listed: list[Annotated[int, Field(ge=1)]] = []
        mapped: dict[str, float] = {}
        optional: int | None = Field(None, le=3)
        nested: Inner = Inner()
        bounded: Annotated[float, Field(gt=0, lt=1)] = 0.5
        flag: bool = False

    assert unbounded_numbers(Loose) == ["plain", "listed.*", "mapped.*", "optional", "nested.low_only"]
    with pytest.raises(TypeError, match="numbers without a range: steps"):
        class Unbounded(Section):  # noqa: F841 - defining it is the test
            steps: int = Field(1, ge=1)


def _numbers(schema: type[BaseModel], prefix: str = "") -> list[tuple[str, type]]:
    """(dotted key with ``*`` for list items and mapping values, int or float) of every number in ``schema``."""
    found = []
    for name, field in schema.model_fields.items():
        found += _leaves(field.annotation, prefix + name)
    return found


def _leaves(annotation, key: str) -> list[tuple[str, type]]:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _leaves(args[0], key)
    if origin in (Union, types.UnionType):
        return [leaf for a in args if a is not type(None) for leaf in _leaves(a, key)]
    if origin in (list, dict):
        return _leaves(args[-1], f"{key}.*")
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return _numbers(annotation, f"{key}.")
    return [(key, annotation)] if annotation in (int, float) else []


def _nested(key: str, value) -> tuple[dict, str]:
    """(config overrides setting ``key`` to ``value``, the key as messages name it)."""
    parts = key.split(".")
    shown = []
    for i, part in enumerate(parts):
        if part == "*":
            shown.append("0" if _is_list(parts[:i]) else "x")
        else:
            shown.append(part)
    data: object = value
    for i in range(len(parts) - 1, -1, -1):
        part = parts[i]
        if part == "*":
            data = [data] if _is_list(parts[:i]) else {"x": data}
        else:
            data = {part: data}
    return data, ".".join(shown)


def _is_list(parts: list[str]) -> bool:
    return parts[-1] in ("targets", "budgets")


CASES = sorted({f"{prefix}{key}": kind for prefix, schema in SCHEMAS.items() for key, kind in _numbers(schema)}.items())


@pytest.mark.parametrize("sign", [1, -1], ids=["huge", "negative"])
@pytest.mark.parametrize("key, kind", CASES, ids=[key for key, _ in CASES])
def test_every_number_out_of_range_refused_before_anything_is_written(tmp_path, capsys, key, kind, sign):
    value = sign * (10**30 if kind is int else 1e308)
    overrides, shown = _nested(key, value)
    if key.startswith("extra_"):
        section = {"files": [str(study_config(tmp_path)["calibration"]["files"][0])]}
        name = key.split(".")[0]
        overrides = {name: {"x": {**section, **overrides[name]["x"]}}}
    if key.startswith("executor."):
        overrides["executor"] = {"kind": "processes", **overrides["executor"]}
    config = write_yaml(tmp_path / "c.yaml", study_config(tmp_path / "out", **overrides))
    refused(capsys, study_main, ["run", str(config), "--no-progress"], [str(config), shown], tmp_path)


@pytest.mark.parametrize("argv, expected", [
    (["bench", "m", "--against", "m", "--batch-size", str(10**12)], "latency.batch_size"),
    (["bench", "m", "--against", "m", "--decode-steps", str(10**9)], "latency.decode_steps"),
    (["bench", "m", "--against", "m", "--context", str(10**12)], "latency.context"),
])
def test_huge_flags_refused_by_the_same_ranges(tmp_path, capsys, argv, expected):
    refused(capsys, study_main, argv, expected, tmp_path)


def test_strategy_settings_have_ranges_too(tmp_path, capsys):
    for settings, expected in [({"n_trials": 10**12}, "'n_trials': input should be less than or equal to 10000000"),
                               ({"seed": 2**40}, "'seed': input should be less than or equal to 4294967295")]:
        config = write_yaml(tmp_path / "c.yaml", study_config(tmp_path / "out", strategies=[
            {"name": "tpe", "settings": settings}]))
        refused(capsys, study_main, ["run", str(config)], ["strategies.0.settings", expected], tmp_path)
