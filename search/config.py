"""Study configuration: YAML validated on load, every error reported at once with file, key and value."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ConfigError(ValueError):
    """A config that cannot be used; the message lists every problem (file, key, value)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_Section):
    name: str  # local path (relative to the config file) or hub id
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"
    trust_remote_code: bool = False


class TextSection(_Section):
    files: list[str] = Field(default_factory=list)  # local .txt / .jsonl, relative to the config file
    dataset: str | None = None  # HF dataset name (for users with a hub)
    dataset_config: str | None = None
    split: str = "train"
    field: str = "text"
    start: float = 0.0  # fraction of the characters where the slice starts
    end: float = 1.0
    num_sequences: int = Field(8, ge=1)
    seq_len: int = Field(256, ge=2)
    seed: int = 0


class ReferenceSection(_Section):
    topk: int | None = Field(None, ge=1)  # None: full-vocabulary reference (exact); k: top-k + tail mass
    batch_size: int = Field(8, ge=1)


class BudgetSection(_Section):
    metric: str = "params"  # a registered budget: params, kv_cache_bytes, sublayers, latency_*
    targets: list[float] = Field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5])  # fractions removed
    constraints: dict[str, float] = Field(default_factory=dict)  # other metric -> max fraction of dense kept

    @field_validator("targets")
    @classmethod
    def _fractions(cls, targets: list[float]) -> list[float]:
        bad = [t for t in targets if not 0.0 < t < 1.0]
        if bad or not targets:
            raise ValueError(f"targets must be fractions removed in (0, 1), got {targets}")
        return sorted(set(targets))


class StrategyEntry(_Section):
    name: str  # registered strategy
    label: str | None = None  # distinct tag when one strategy runs twice with other settings
    settings: dict[str, Any] = Field(default_factory=dict)

    @property
    def tag(self) -> str:
        return self.label or self.name


class ExecutorSection(_Section):
    kind: Literal["inprocess", "processes", "ray"] = "inprocess"
    workers: int = Field(1, ge=1)
    address: str | None = None  # ray: join an existing cluster
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"CPU": 1})


class StudyConfig(_Section):
    model: ModelSection
    calibration: TextSection
    heldout: TextSection
    objective: Literal["kl", "js", "ppl"] = "kl"
    reference: ReferenceSection = Field(default_factory=ReferenceSection)
    budget: BudgetSection = Field(default_factory=BudgetSection)
    strategies: list[StrategyEntry]
    storage: str | None = None  # Optuna storage URL; default: sqlite file in the output directory
    executor: ExecutorSection = Field(default_factory=ExecutorSection)
    confirm: dict[str, Any] = Field(default_factory=dict)  # validated by search.confirm
    latency: dict[str, Any] = Field(default_factory=dict)  # validated by objectives.latency
    seed: int = 0
    output_dir: str = "runs/study"

    source: Path | None = Field(None, exclude=True)  # the YAML file this came from


def _format_errors(path: Path, error: ValidationError) -> str:
    lines = [f"{path}: {len(error.errors())} problem(s)"]
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        value = item.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {key}: {item['msg']}{shown}")
    return "\n".join(lines)


def load_config(path: str | Path) -> StudyConfig:
    """Parse and validate a study YAML; relative paths stay relative to the YAML's folder (see resolve)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        config = StudyConfig(**raw)
    except ValidationError as error:
        raise ConfigError(_format_errors(path, error)) from None
    config.source = path
    return config


def resolve(config: StudyConfig, relative: str) -> str:
    """A path from the config, taken relative to the config file's folder when it is not absolute."""
    if config.source is None or Path(relative).is_absolute():
        return relative
    candidate = config.source.parent / relative
    return str(candidate) if candidate.exists() or relative.startswith(".") else relative
