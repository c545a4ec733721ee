"""The study config's ``confirm:`` section: which benchmarks ``confirm`` runs and how it heals.

A schema read by the config check and by the ``confirm`` command alike, so reading a study config needs no
command module.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, ValidationError

from search.schema import (
    BATCH_MAX, COUNT_MAX, TOKENS_MAX, ConfigError, Section, Seed, format_problems, validation_problems,
)

if TYPE_CHECKING:
    from search.commands.heal import HealSettings
    from search.config import StudyConfig

DEFAULT_TASKS = ["tinystories_ppl", "tinystories_cloze", "tinystories_next"]
SAMPLES_MAX = 10**9  # samples per benchmark task


class CorpusSection(Section):
    """Healing text: local .txt/.jsonl files or an HF dataset; default: the study's calibration text."""

    files: list[str] = Field(default_factory=list)
    dataset: str | None = None
    dataset_config: str | None = None
    split: str = "train"
    field: str = "text"
    start: float = Field(0.0, ge=0.0, le=1.0)
    end: float = Field(1.0, ge=0.0, le=1.0)


class HealSection(Section):
    rank: int = Field(8, ge=1, le=4096)
    alpha: float = Field(16.0, gt=0, le=1e6)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    steps: int = Field(100, ge=1, le=COUNT_MAX)
    lr: float = Field(2e-3, gt=0, le=10.0)
    batch_size: int = Field(8, ge=1, le=BATCH_MAX)
    seq_len: int = Field(256, ge=2, le=TOKENS_MAX)
    warmup: int = Field(10, ge=0, le=COUNT_MAX)
    weight_decay: float = Field(0.0, ge=0.0, le=1e3)
    grad_clip: float = Field(1.0, gt=0, le=1e6)
    distill: float = Field(0.0, ge=0.0, le=1.0)  # weight of KL to the dense model's logits
    temperature: float = Field(1.0, gt=0, le=1e3)
    quantize: Literal["auto", "4bit", "none"] = "auto"  # auto: QLoRA (4-bit NF4) on CUDA, plain LoRA on CPU
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    seed: Seed = 0
    corpus: CorpusSection | None = None

    def settings(self) -> HealSettings:
        from search.commands.heal import HealSettings  # the healing code's own settings (imports torch)

        return HealSettings(**self.model_dump(exclude={"corpus"}))


class ConfirmSettings(Section):
    tasks: list[str] = Field(default_factory=lambda: list(DEFAULT_TASKS), min_length=1)
    limit: int | None = Field(None, ge=1, le=SAMPLES_MAX)  # samples per task (None: all)
    limits: dict[str, Annotated[int, Field(ge=1, le=SAMPLES_MAX)] | None] = Field(  # per-task overrides of limit
        default_factory=dict)
    top_k: int = Field(3, ge=1, le=1000)  # the K front masks with the lowest held-out perplexity
    budgets: list[Annotated[float, Field(gt=0.0, lt=1.0)]] = Field(  # instead: the best front mask removing >= each
        default_factory=list)
    batch_size: int = Field(8, ge=1, le=BATCH_MAX)  # lm-eval batch size
    heal: HealSection = Field(default_factory=HealSection)

    def fingerprint(self) -> str:
        """What a candidate's numbers depend on (candidates with another fingerprint are redone)."""
        keep = self.model_dump(mode="json", exclude={"top_k", "budgets"})
        return hashlib.sha1(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]


def confirm_settings(config: StudyConfig, source: Path | None = None) -> ConfirmSettings:
    """Validate the config's ``confirm:`` mapping; every problem named with its key, at once."""
    try:
        return ConfirmSettings(**(config.confirm or {}))
    except ValidationError as error:
        problems = validation_problems(error, prefix=("confirm",))
        raise ConfigError(format_problems(source or config.source, problems)) from None
