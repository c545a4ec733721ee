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

from objectives.text_source import TextSource
from surgery.formats import DEFAULT_RIDGE as REPAIR_RIDGE
from search.schema import (
    BATCH_MAX, COUNT_MAX, TOKENS_MAX, ConfigError, Ridge, Section, Seed, format_problems, validation_problems,
)

if TYPE_CHECKING:
    from search.config import StudyConfig

VARIANTS = ("pruned", "repaired", "healed", "repaired_healed")  # what confirm builds from each candidate mask
LABELS = {"dense": "dense", "pruned": "pruned", "repaired": "repaired", "healed": "LoRA",
          "repaired_healed": "repaired+LoRA"}
DEFAULT_TASKS = ["tinystories_ppl", "tinystories_cloze", "tinystories_next"]
SAMPLES_MAX = 10**9  # samples per benchmark task


class HealSettings(Section):
    """LoRA and training settings of healing (frozen; the code in ``search.commands.heal`` takes them as they are)."""

    model_config = {**Section.model_config, "frozen": True}

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
    distill: float = Field(0.0, ge=0.0, le=1.0)  # weight of KL to the dense model's logits; the LM loss gets the rest
    temperature: float = Field(1.0, gt=0, le=1e3)
    quantize: Literal["auto", "4bit", "none"] = "auto"  # auto: QLoRA (4-bit NF4) on CUDA, plain LoRA on CPU
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    seed: Seed = 0


class HealSection(HealSettings):
    """``confirm.heal``: the healing settings and the text to heal on."""

    model_config = {**Section.model_config, "frozen": False}

    corpus: TextSource | None = None  # healing text (files relative to the config, else cwd); default: calibration

    def settings(self) -> HealSettings:
        return HealSettings(**self.model_dump(exclude={"corpus"}))


def wanted(repair: str) -> tuple[str, ...]:
    """The variants measured under a ``confirm.repair`` setting."""
    return VARIANTS if repair != "none" else ("pruned", "healed")


class ConfirmSettings(Section):
    tasks: list[str] = Field(default_factory=lambda: list(DEFAULT_TASKS), min_length=1)
    limit: int | None = Field(None, ge=1, le=SAMPLES_MAX)  # samples per task (None: all)
    limits: dict[str, Annotated[int, Field(ge=1, le=SAMPLES_MAX)] | None] = Field(  # per-task overrides of limit
        default_factory=dict)
    top_k: int = Field(3, ge=1, le=1000)  # the K front masks with the lowest held-out perplexity
    budgets: list[Annotated[float, Field(gt=0.0, lt=1.0)]] = Field(  # instead: the best front mask removing >= each
        default_factory=list)
    batch_size: int = Field(8, ge=1, le=BATCH_MAX)  # lm-eval and held-out perplexity batch size
    dtype: Literal["study", "float32", "bfloat16"] = "study"  # the models' dtype (study: model.dtype)
    heldout: bool = True  # perplexity of every variant on the study's held-out texts
    export: bool = True  # write each variant's model under its candidate's folder
    repair: Literal["none", "linear"] = "none"  # linear: add the repaired and repaired+LoRA variants
    repair_calibration: list[str] = Field(default_factory=list)  # PATH[:START:END]; default: the study's calibration
    repair_sequences: int = Field(16, ge=1, le=COUNT_MAX)  # windows of each repair text
    repair_seq_len: int = Field(128, ge=2, le=TOKENS_MAX)
    repair_ridge: Ridge = REPAIR_RIDGE  # each map's pull towards the identity (surgery/repair.py)
    recovery_tasks: list[str] = Field(default_factory=list)  # tasks of the "won back" line (default: accuracies)
    variants: list[Literal["dense", "pruned", "repaired", "healed", "repaired_healed"]] = Field(  # to measure now
        default_factory=list)  # (default: dense and every variant the repair setting gives); others come from cache
    heal: HealSection = Field(default_factory=HealSection)

    def evaluation(self) -> dict:
        """The settings the benchmark and held-out numbers of a model depend on."""
        return self.model_dump(mode="json", include={"tasks", "limit", "limits", "batch_size", "dtype", "heldout"})

    def variant_fingerprint(self, variant: str, identity: dict | None = None) -> str:
        """What one variant's numbers depend on: the evaluation, and the repair and healing settings it uses."""
        keys = {"export"}
        if variant in ("healed", "repaired_healed"):
            keys |= {"heal"}
        if self.uses_repair(variant):
            keys |= {"repair", "repair_calibration", "repair_sequences", "repair_seq_len", "repair_ridge"}
        return _digest(self.evaluation() | self.model_dump(mode="json", include=keys), identity)

    @staticmethod
    def uses_repair(variant: str) -> bool:
        """Whether ``variant`` is built with the linear repair (its numbers depend on the repair's texts)."""
        return variant in ("repaired", "repaired_healed")

    def fingerprint(self, identity: dict | None = None) -> str:
        """What a candidate's numbers depend on (with ``identity``: the model and held-out text); candidates with
        another fingerprint are redone."""
        return _digest(self.model_dump(mode="json", exclude={"top_k", "budgets", "recovery_tasks", "variants"}),
                       identity)

    def chosen(self) -> list[str]:
        """The models measured by this run: ``variants``, or dense and every variant of the repair setting."""
        return [v for v in ("dense", *wanted(self.repair)) if not self.variants or v in self.variants]

    def dense_fingerprint(self, identity: dict | None = None) -> str:
        """What the dense model's numbers depend on."""
        return _digest(self.evaluation(), identity)


def _digest(settings: dict, identity: dict | None) -> str:
    text = json.dumps([settings, identity or {}], sort_keys=True) if identity else json.dumps(settings, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def confirm_settings(config: StudyConfig, source: Path | None = None) -> ConfirmSettings:
    """Validate the config's ``confirm:`` mapping; every problem named with its key, at once."""
    try:
        return ConfirmSettings(**(config.confirm or {}))
    except ValidationError as error:
        problems = validation_problems(error, prefix=("confirm",))
        raise ConfigError(format_problems(source or config.source, problems)) from None
