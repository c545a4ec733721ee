"""Score keep-masks of one loaded model on one token batch with one proxy objective."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from surgery.families import family_for, get_path
from surgery.mask import KeepMask
from surgery.masking import masker_for
from surgery.formats import DEFAULT_RIDGE
from surgery.repair import LinearRepair, fit_linear_repair, folded, removed_runs

from .lru import BytesLRU, tensor_bytes
from .proxy import OBJECTIVES, Objective, Reference

REPAIRS = ("none", "linear")  # how a mask's model is scored: as masked, or with its linear repair folded in


def split_problem(repair_sequences: int, sequences: int) -> str:
    """Why a calibration batch of ``sequences`` cannot be split for repair-aware scoring (``repair_sequences`` fit)."""
    return (f"engine.repair_sequences ({repair_sequences}) must be less than the calibration sequences ({sequences}): "
            "repair-aware scoring fits each repair on the batch's first engine.repair_sequences sequences and scores "
            "masks on the others only")


class MaskScorer:
    """Runs the model under masks (reversible runtime masking) and reduces the objective over the batch.

    The dense reference is computed once at construction. ``score(mask, sequences=n)`` uses only the first n
    sequences (staged selection scores many candidates cheaply that way).

    ``repair="linear"``: repair-aware scoring, cross-fitted. The batch is split: its first ``repair_sequences``
    sequences (``repair_ids``) only fit repairs, the rest (``input_ids``, which the dense reference, ``score``'s
    ``sequences`` and every other method see) are scored, so no mask is scored on the tokens its repair was fitted
    on. Every mask is scored as the *repaired* masked model: the linear repair of ``surgery.repair``
    (``fit_linear_repair``, with ``repair_ridge``) fitted for that mask on ``repair_ids`` and folded in (``folded``)
    while it is scored.
    Fits are kept per mask (least recently used out past ``repair_cache_mb``) and the dense streams they fit
    against are computed once; the dense model (no removed run) is scored as it is.
    """

    def __init__(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        objective: str | Objective = "kl",
        *,
        batch_size: int = 8,
        topk: int | None = None,
        repair: str = "none",
        repair_sequences: int = 8,
        repair_ridge: float = DEFAULT_RIDGE,
        repair_cache_mb: float = 256,
    ):
        if repair not in REPAIRS:
            raise ValueError(f"repair must be one of {', '.join(REPAIRS)}, got {repair!r}")
        if repair_sequences < 1:
            raise ValueError(f"repair_sequences must be >= 1, got {repair_sequences}")
        self.repair_ids = None  # repair-aware: the sequences each repair is fitted on, never scored
        if repair != "none":
            if repair_sequences >= len(input_ids):
                raise ValueError(split_problem(repair_sequences, len(input_ids)))
            self.repair_ids, input_ids = input_ids[:repair_sequences], input_ids[repair_sequences:]
        self.model = model.eval()
        self.masker = masker_for(model)
        self.input_ids = input_ids  # the scored sequences
        self.objective = OBJECTIVES.get(objective) if isinstance(objective, str) else objective
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self.positions_per_sequence = input_ids.shape[1] - 1
        self.forward_count = 0  # model forwards over one micro-batch, for cost accounting
        self.reference = self._reference(topk) if self.objective.needs_reference else None
        self.repair = repair
        self.repair_sequences = repair_sequences if self.repair_ids is not None else 0
        self.repair_ridge = repair_ridge
        self.repair_fits = 0  # masks whose repair was fitted (each fit: one forward per removed run)
        self._repairs: BytesLRU[LinearRepair] = BytesLRU(repair_cache_mb * 2**20, _repair_bytes)
        self._dense_streams: dict[int, torch.Tensor] = {}

    @property
    def num_layers(self) -> int:
        return self.masker.num_layers

    def _chunks(self, sequences: int):
        for start in range(0, sequences, self.batch_size):
            yield start, self.input_ids[start : min(start + self.batch_size, sequences)].to(self.device)

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        self.forward_count += 1
        return self.model(input_ids=ids, use_cache=False).logits

    @torch.no_grad()
    def _reference(self, topk: int | None) -> Reference:
        self.masker.restore()
        parts = [Reference.from_logits(self.logits(ids), topk) for _, ids in self._chunks(len(self.input_ids))]
        cat = lambda xs: None if xs[0] is None else torch.cat(xs)  # noqa: E731
        return Reference(cat([p.logp for p in parts]), cat([p.index for p in parts]), cat([p.log_tail for p in parts]))

    def reference_rows(self, start: int, count: int) -> Reference | None:
        if self.reference is None:
            return None
        width = self.positions_per_sequence
        return self.reference.slice(slice(start * width, (start + count) * width))

    # repair-aware scoring ---------------------------------------------------------------------------------
    def repair_for(self, mask: KeepMask) -> LinearRepair | None:
        """The linear repair ``mask`` is scored with (None: repair off, or nothing to repair)."""
        if self.repair == "none" or not removed_runs(mask):
            return None
        fit = self._repairs.get(mask.bits)
        if fit is None:
            ids = self.repair_ids.to(self.device)
            fit = fit_linear_repair(self.model, mask, ids, ridge=self.repair_ridge, dense_streams=self._dense_streams)
            self.repair_fits += 1
            self._repairs.put(mask.bits, fit)
        return fit

    def first_repaired(self, mask: KeepMask) -> int:
        """The first sublayer whose weights repair-aware scoring changes for ``mask`` (its first anchor), or 2L:
        the residual stream entering any sublayer up to this one is the unrepaired masked model's."""
        if self.repair == "none":
            return 2 * mask.num_layers
        return min((run.anchor for run in removed_runs(mask)), default=2 * mask.num_layers)

    def repaired(self, mask: KeepMask):
        """A context in which the model is the one ``mask`` is scored as (its repair folded in, if any)."""
        repair = self.repair_for(mask)
        return nullcontext(self.model) if repair is None else folded(self.model, repair)

    # scoring -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, mask: KeepMask, sequences: int | None = None) -> float:
        """Objective of ``mask`` averaged over positions of the first ``sequences`` sequences."""
        sequences = len(self.input_ids) if sequences is None else min(sequences, len(self.input_ids))
        with self.repaired(mask):
            self.masker.apply(mask)
            total = 0.0
            for start, ids in self._chunks(sequences):
                logits = self.logits(ids)
                total += float(self.objective.summed(logits, self.reference_rows(start, len(ids)), ids))
        return self.objective.finish(total / (sequences * self.positions_per_sequence))

    @torch.no_grad()
    def window_values(self, mask: KeepMask) -> list[float]:
        """The objective's mean per position of each sequence, before ``finish`` (e.g. log-perplexity for ppl):
        per-window values, for standard errors and per-domain means."""
        values = []
        with self.repaired(mask):
            self.masker.apply(mask)
            for start, ids in self._chunks(len(self.input_ids)):
                logits = self.logits(ids)
                for row in range(len(ids)):
                    summed = self.objective.summed(logits[row : row + 1], self.reference_rows(start + row, 1),
                                                   ids[row : row + 1])
                    values.append(float(summed) / self.positions_per_sequence)
        return values

    @torch.no_grad()
    def hidden_states(self, mask: KeepMask | None = None) -> list[torch.Tensor]:
        """Residual stream entering each decoder layer plus the last layer's output: L+1 tensors [N, T, H]."""
        self.masker.apply(mask or KeepMask.dense(self.num_layers))
        layers = get_path(self.model, family_for(self.model.config).layers)
        captured: list[list[torch.Tensor]] = [[] for _ in range(len(layers) + 1)]
        hooks = [layer.register_forward_pre_hook(self._capture_input(captured[i]), with_kwargs=True)
                 for i, layer in enumerate(layers)]
        hooks.append(layers[-1].register_forward_hook(lambda m, a, out: captured[-1].append(_first(out).cpu())))
        try:
            for _, ids in self._chunks(len(self.input_ids)):
                self.logits(ids)
        finally:
            for hook in hooks:
                hook.remove()
        return [torch.cat(parts) for parts in captured]

    @staticmethod
    def _capture_input(store: list[torch.Tensor]):
        def hook(module, args, kwargs):
            store.append((args[0] if args else kwargs["hidden_states"]).detach().cpu())

        return hook


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _repair_bytes(repair: LinearRepair) -> int:
    return sum(tensor_bytes(t) for t in repair.maps.values())
