"""Score keep-masks of one loaded model on one token batch with one proxy objective."""

from __future__ import annotations

import torch
from torch import nn

from surgery.families import family_for, get_path
from surgery.mask import KeepMask
from surgery.masking import masker_for

from .proxy import OBJECTIVES, Objective, Reference


class MaskScorer:
    """Runs the model under masks (reversible runtime masking) and reduces the objective over the batch.

    The dense reference is computed once at construction. ``score(mask, sequences=n)`` uses only the first n
    sequences (staged selection scores many candidates cheaply that way).
    """

    def __init__(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        objective: str | Objective = "kl",
        *,
        batch_size: int = 8,
        topk: int | None = None,
    ):
        self.model = model.eval()
        self.masker = masker_for(model)
        self.input_ids = input_ids
        self.objective = OBJECTIVES.get(objective) if isinstance(objective, str) else objective
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self.positions_per_sequence = input_ids.shape[1] - 1
        self.forward_count = 0  # model forwards over one micro-batch, for cost accounting
        self.reference = self._reference(topk) if self.objective.needs_reference else None

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

    @torch.no_grad()
    def score(self, mask: KeepMask, sequences: int | None = None) -> float:
        """Objective of ``mask`` averaged over positions of the first ``sequences`` sequences."""
        sequences = len(self.input_ids) if sequences is None else min(sequences, len(self.input_ids))
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
        self.masker.apply(mask)
        values = []
        for start, ids in self._chunks(len(self.input_ids)):
            logits = self.logits(ids)
            for row in range(len(ids)):
                summed = self.objective.summed(logits[row : row + 1], self.reference_rows(start + row, 1), ids[row : row + 1])
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
