"""What every config section is built from: bounded numbers, a strict ``Section`` base, and problems reported
together with their keys. The study config (``search.config``) and its free-form sections (``confirm:``) use it."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Annotated, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

from surgery.errors import UserError

SEED_MAX = 2**32 - 1  # numpy and torch generators take seeds up to this
# Every number a config holds has a range (``ge``/``gt`` and ``le``/``lt``), checked when the YAML is validated,
# before anything is written; ``Section`` refuses to define a section with an unbounded number.
COUNT_MAX = 1_000_000  # sequences, repeats, stage sizes: far beyond any study, short of an allocation that fails
TOKENS_MAX = 1 << 20  # tokens per sequence (the model's positions are checked once it is read)
BATCH_MAX = 4096  # sequences per forward pass
WORKERS_MAX = 1024
CACHE_MB_MAX = 1 << 20  # 1 TiB of prefix states
RIDGE_MAX = 1e6  # a repair ridge far past this is plain pruning (each map is the identity)
Ridge = Annotated[float, Field(gt=0, le=RIDGE_MAX)]  # the linear repair's pull towards the identity
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]


class ConfigError(UserError):
    """A config that cannot be used; the message lists every problem (file, key, value)."""


def unbounded_numbers(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Keys of the numbers in ``model`` (nested sections, list items and mapping values too) that lack a lower or
    an upper bound."""
    found = []
    for name, field in model.model_fields.items():
        found += _unbounded(field.annotation, list(field.metadata), prefix + name)
    return found


def _unbounded(annotation, metadata: list, key: str) -> list[str]:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        extra = [m for a in args[1:] for m in (a.metadata if isinstance(a, FieldInfo) else [a])]
        return _unbounded(args[0], metadata + extra, key)
    if origin in (Union, types.UnionType):
        return sorted({k for a in args if a is not type(None) for k in _unbounded(a, metadata, key)})
    if origin in (list, dict, tuple):
        return _unbounded(args[-1], [], f"{key}.*") if args else []
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return unbounded_numbers(annotation, f"{key}.")
    if annotation in (int, float):
        kinds = {type(m).__name__ for m in metadata}
        return [] if kinds & {"Ge", "Gt"} and kinds & {"Le", "Lt"} else [key]
    return []


class Section(BaseModel):
    """A config section: unknown keys and non-finite numbers refused, every number bounded."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs):
        super().__pydantic_init_subclass__(**kwargs)
        missing = unbounded_numbers(cls)
        if missing:
            raise TypeError(f"{cls.__name__}: numbers without a range: {', '.join(missing)}")


def format_problems(path: Path | str | None, problems: list[str]) -> str:
    """One message for many problems: ``FILE: N problem(s)`` then one indented ``key: what (got value)`` each (a
    problem two checks found is listed once)."""
    problems = list(dict.fromkeys(problems))
    return "\n".join([f"{path or '(config)'}: {len(problems)} problem(s)", *(f"  {p}" for p in problems)])


def validation_problems(error: ValidationError, prefix: tuple[str, ...] = ()) -> list[str]:
    """One ``key: what (got value)`` line per pydantic error; ``prefix`` names the enclosing section."""
    problems = []
    for item in error.errors():
        key = ".".join(str(p) for p in (*prefix, *item["loc"])) or "(top level)"
        value = item.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        problems.append(f"{key}: {item['msg']}{shown}")
    return problems
