"""Reversible runtime masking: run a loaded model under a KeepMask without copying or reloading weights.

A removed sublayer's module is swapped for a weightless stand-in that returns zeros (so its compute is
skipped); restoring puts the very same module objects back. Layers whose attention is removed are marked
``"moe"`` in ``config.layer_types`` while masked, which transformers maps to a KV-cache layer that stores
nothing, so ``generate()`` with a KV cache keeps working (sequence length comes from the first attention).
A mask without any attention leaves the cache types alone: no layer reads the cache then.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

from .families import Family, family_for, get_path
from .mask import ATTN, FFN, KeepMask
from .pruned_modeling import SkippedAttention, SkippedFFN

_NO_ATTENTION = "moe"  # a transformers layer type whose cache layer holds no KV
_UNSET = object()


def default_layer_types(config) -> list[str]:
    """The per-layer attention types transformers would infer for the KV cache."""
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    kind = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
    return [kind] * config.num_hidden_layers


class RuntimeMasker:
    """Swaps sublayer modules of one model in place; ``apply`` only touches sublayers that change."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.family: Family = family_for(model.config)
        self.layers: nn.ModuleList = get_path(model, self.family.layers)
        self.originals = [self._sublayer_modules(layer) for layer in self.layers]
        self.current = KeepMask.dense(len(self.layers))
        self._layer_types = getattr(model.config, "layer_types", _UNSET)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _sublayer_modules(self, layer: nn.Module) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
        attn = {self.family.attn: getattr(layer, self.family.attn)}
        ffn = {name: getattr(layer, name) for name in self.family.ffn}
        return attn, ffn

    def _stand_ins(self, layer_index: int, kind: int) -> dict[str, nn.Module]:
        if kind == ATTN:
            return {self.family.attn: SkippedAttention()}
        names = self.family.ffn
        return {name: SkippedFFN(None if i == len(names) - 1 else 0) for i, name in enumerate(names)}

    def apply(self, mask: KeepMask) -> None:
        """Make the model compute ``mask``; sublayers already in the right state are left alone."""
        mask.check_layers(self.num_layers)
        for index, (now, want) in enumerate(zip(self.current.bits, mask.bits)):
            if now == want:
                continue
            layer, kind = divmod(index, 2)
            modules = self.originals[layer][kind] if want else self._stand_ins(layer, kind)
            for name, module in modules.items():
                setattr(self.layers[layer], name, module)
        self.current = mask
        self._set_layer_types(mask)

    def restore(self) -> None:
        """Put every original module back: the model is exactly the dense model again."""
        self.apply(KeepMask.dense(self.num_layers))

    def _set_layer_types(self, mask: KeepMask) -> None:
        config = self.model.config
        if mask.removed_attn in (0, mask.num_layers):  # no attention at all: nothing reads the cache
            if self._layer_types is _UNSET:
                config.__dict__.pop("layer_types", None)
            else:
                config.layer_types = self._layer_types
            return
        base = default_layer_types(config) if self._layer_types is _UNSET else list(self._layer_types or [])
        base = base or default_layer_types(config)
        config.layer_types = [t if mask.keeps(i, ATTN) else _NO_ATTENTION for i, t in enumerate(base)]


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
