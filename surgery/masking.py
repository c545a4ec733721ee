"""Reversible runtime masking: run a loaded model under a KeepMask without copying or reloading weights.

A removed sublayer's module is swapped for a weightless stand-in that returns zeros (so its compute is
skipped); restoring puts the very same module objects back. A removed attention keeps its layer of a KV cache at
the right length with a one-number-per-token placeholder (``SkippedAttention``), so ``generate()`` with a cache
gives the same tokens as without one. The config is never touched.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

from .families import Family, family_for, get_path
from .mask import ATTN, FFN, KeepMask
from .pruned_modeling import SkippedAttention, cache_layer_index, ffn_stand_ins


class RuntimeMasker:
    """Swaps sublayer modules of one model in place; ``apply`` only touches sublayers that change."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.family: Family = family_for(model.config)
        self.layers: nn.ModuleList = get_path(model, self.family.layers)
        self.originals = [self._sublayer_modules(layer) for layer in self.layers]
        self.current = KeepMask.dense(len(self.layers))
        self._stand_ins: dict[tuple[int, int], dict[str, nn.Module]] = {}

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _sublayer_modules(self, layer: nn.Module) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
        attn = {self.family.attn: getattr(layer, self.family.attn)}
        ffn = {name: getattr(layer, name) for name in self.family.ffn}
        return attn, ffn

    def stand_ins(self, layer: int, kind: int) -> dict[str, nn.Module]:
        """The weightless modules that replace one sublayer's modules (made once, by attribute name)."""
        key = (layer, kind)
        if key not in self._stand_ins:
            if kind == ATTN:
                original = self.originals[layer][ATTN][self.family.attn]
                self._stand_ins[key] = {self.family.attn: SkippedAttention(cache_layer_index(original, layer))}
            else:
                originals = self.originals[layer][FFN]
                self._stand_ins[key] = dict(zip(originals, ffn_stand_ins(list(originals.values()))))
        return self._stand_ins[key]

    def swap(self, layer: int, kind: int, keep: bool) -> None:
        """Put one sublayer's original modules (``keep``) or its stand-ins in place; ``current`` is not changed.

        :meth:`apply` is built on it; a caller that runs one sublayer of a layer alone (the prefix engine)
        swaps the other one out and back around the call.
        """
        modules = self.originals[layer][kind] if keep else self.stand_ins(layer, kind)
        for name, module in modules.items():
            setattr(self.layers[layer], name, module)

    def apply(self, mask: KeepMask) -> None:
        """Make the model compute ``mask``; sublayers already in the right state are left alone."""
        mask.check_layers(self.num_layers)
        for index, (now, want) in enumerate(zip(self.current.bits, mask.bits)):
            if now != want:
                self.swap(*divmod(index, 2), keep=want)
        self.current = mask

    def restore(self) -> None:
        """Put every original module back: the model is exactly the dense model again."""
        self.apply(KeepMask.dense(self.num_layers))


def masker_for(model: nn.Module) -> RuntimeMasker:
    """The one masker attached to ``model`` (created on first use)."""
    masker = model.__dict__.get("_depthsearch_masker")
    if masker is None:
        masker = RuntimeMasker(model)
        model.__dict__["_depthsearch_masker"] = masker
    return masker


@contextmanager
def masked(model: nn.Module, mask: KeepMask | str) -> Iterator[nn.Module]:
    """Run ``model`` under ``mask`` inside the block; the previous mask is restored afterwards."""
    masker = masker_for(model)
    if isinstance(mask, str):
        mask = KeepMask.parse(mask, masker.num_layers)
    previous = masker.current
    masker.apply(mask)
    try:
        yield model
    finally:
        masker.apply(previous)


def kept_kinds(mask: KeepMask, layer: int) -> tuple[bool, bool]:
    return mask.keeps(layer, ATTN), mask.keeps(layer, FFN)
