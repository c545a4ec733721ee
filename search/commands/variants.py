"""The model variants ``confirm`` measures for one candidate mask, each built from the dense model.

- ``pruned``: the mask applied;
- ``repaired``: the training-free linear repair (``surgery/repair.py``) folded into the kept weights;
- ``healed``: LoRA healing of the pruned weights;
- ``repaired_healed``: LoRA healing that starts from the repaired weights.

Each variant is benchmarked with lm-eval, scored on the study's held-out texts and exported; its record holds
the seconds spent building it from the dense model (repair fit, LoRA training, or both) and evaluating it. A
variant's record is saved as soon as it is measured, so an interrupted candidate resumes at the next variant.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from search.confirm_settings import LABELS, VARIANTS, wanted  # noqa: F401 - part of this module's interface
from surgery.files import atomic_write_text

@dataclass
class Context:
    """What every candidate shares: the dense model, its tokenizer, the settings and the token data."""

    dense: object
    tokenizer: object
    settings: object  # ConfirmSettings
    data: object  # healing windows [n, seq_len]
    source: str  # the model's name, for the model cards
    heldout: dict = field(default_factory=dict)  # report column -> held-out token windows
    calibration: list | None = None  # repair texts (TextSource); None: the bundled default of surgery/repair.py
    identity: dict = field(default_factory=dict)  # model and held-out text, part of every fingerprint
    repair_identity: dict = field(default_factory=dict)  # the repair texts, part of the repaired variants' ones


def bench(model, tokenizer, settings, progress: bool) -> dict[str, dict]:
    """lm-eval results per task: headline metric, value, its standard error, sample count, every metric."""
    from objectives.benchmarks import evaluate

    results = evaluate(model, tokenizer, settings.tasks, limit=settings.limit, limits=settings.limits,
                       batch_size=settings.batch_size, progress=progress)
    return {name: {"metric": r.headline, "value": r.value, "stderr": r.stderr.get(r.headline),
                   "higher_is_better": r.higher_is_better, "samples": r.samples, "metrics": r.metrics,
                   "stderrs": r.stderr} for name, r in results.items()}


def measure(model, ctx: Context, progress: bool) -> dict:
    """Benchmarks and held-out perplexities of ``model``, and the seconds they took."""
    from objectives.benchmarks import perplexity

    started = time.perf_counter()
    scores = bench(model, ctx.tokenizer, ctx.settings, progress)
    ppl = {column: perplexity(model, ids, batch_size=ctx.settings.batch_size) for column, ids in ctx.heldout.items()}
    return {"scores": scores, "heldout_ppl": ppl, "eval_seconds": time.perf_counter() - started}


@dataclass
class Built:
    """A variant's model (pruned layout), the seconds it took from the dense model, what to record about how it
    was made, and how to export it."""

    model: object
    seconds: float
    info: dict
    export: Callable[[Path, dict], Path]


class CandidateModels:
    """Builds one mask's variants from the dense model; the repair is fitted at most once."""

    def __init__(self, ctx: Context, mask):
        self.ctx, self.mask = ctx, mask
        self._repair = None

    def repair(self):
        """(fitted LinearRepair, seconds the fit took)."""
        if self._repair is None:
            from surgery.repair import fit_for_export

            settings, started = self.ctx.settings, time.perf_counter()
            fitted = fit_for_export(self.ctx.dense, self.ctx.tokenizer, self.mask, self.ctx.calibration,
                                    sequences=settings.repair_sequences, seq_len=settings.repair_seq_len,
                                    ridge=settings.repair_ridge)
            self._repair = (fitted, time.perf_counter() - started)
        return self._repair

    def pruned(self, repair=None):
        """A pruned copy of the dense model, with ``repair`` folded into its kept weights."""
        from surgery.export import prune_model
        from surgery.repair import folded

        with folded(self.ctx.dense, repair):
            return prune_model(copy.deepcopy(self.ctx.dense), self.mask)

    def build(self, variant: str, out: Path, progress: bool) -> Built:
        """``variant``'s model; ``out`` holds the candidate's exports (QLoRA loads its base from there)."""
        repair, fit_seconds, info = None, 0.0, {}
        if variant in ("repaired", "repaired_healed"):
            from surgery.repair import describe

            repair, fit_seconds = self.repair()
            info = {"repair": describe(repair), "repair_seconds": fit_seconds}
        started = time.perf_counter()
        model = self.pruned(repair)
        if variant in ("pruned", "repaired"):
            return Built(model, time.perf_counter() - started + fit_seconds, info,
                         lambda folder, metrics: self._export(self.ctx.dense, folder, metrics, repair))
        base_dir = out / ("repaired" if repair is not None else "pruned")
        healed = self._heal(model, base_dir if base_dir.is_dir() else None, progress)
        info.update(healed["info"])
        return Built(healed["model"], time.perf_counter() - started + fit_seconds, info,
                     lambda folder, metrics: self._export_healed(healed["model"], folder, metrics))

    def _heal(self, pruned, base_dir: Path | None, progress: bool) -> dict:
        from search.commands.heal import heal

        settings = self.ctx.settings
        teacher = self.ctx.dense if settings.heal.distill > 0 else None
        result = heal(pruned, self.ctx.data, settings.heal.settings(), teacher=teacher, pretrained_dir=base_dir,
                      progress=progress)
        return {"model": result.model, "info": {
            "heal_seconds": result.seconds, "heal_mode": result.mode, "heal_trainable": result.trainable,
            "heal_loss_first": result.losses[0], "heal_loss_last": result.losses[-1]}}

    def _export(self, model, out: Path, metrics: dict, repair=None) -> Path:
        from surgery.export import export_pruned

        return export_pruned(model, self.ctx.tokenizer, self.mask, out, source=self.ctx.source, metrics=metrics,
                             force=True, repair=repair)

    def _export_healed(self, healed, out: Path, metrics: dict) -> Path:
        from search.commands.heal import healed_into_dense

        return self._export(healed_into_dense(self.ctx.dense, healed, self.mask), out, metrics)


def summary(measured: dict) -> dict[str, float]:
    """The model card's metrics line: each task's headline value and each held-out perplexity."""
    values = {f"{task} {v['metric']}": v["value"] for task, v in measured["scores"].items()}
    return values | {column: value for column, value in measured["heldout_ppl"].items()}


def run_variant(models: CandidateModels, variant: str, out: Path, progress: bool) -> dict:
    """One variant's record, reused from ``out/<variant>.json`` when measured with the settings it depends on."""
    ctx = models.ctx
    identity = ctx.identity | (ctx.repair_identity if ctx.settings.uses_repair(variant) else {})
    fingerprint = ctx.settings.variant_fingerprint(variant, identity)
    path = out / f"{variant}.json"
    if path.is_file():
        done = json.loads(path.read_text())
        if done.get("fingerprint") == fingerprint:
            return done
    built = models.build(variant, out, progress)
    measured = measure(built.model, models.ctx, progress)
    record = {"variant": variant, "fingerprint": fingerprint, "build_seconds": built.seconds, **built.info,
              **measured}
    if models.ctx.settings.export:
        record["dir"] = str(built.export(out / variant, summary(measured)))
    atomic_write_text(path, json.dumps(record, indent=1))
    return record
