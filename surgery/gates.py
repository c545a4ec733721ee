"""Differentiable sublayer gates: scale each sublayer's residual contribution by a gate value.

Inside ``with SublayerGates(model) as gates:`` the model computes, for every layer,
``h = h + g_A * attn(norm(h)); h = h + g_M * ffn(norm(h))`` with ``g = gates.values``: a tensor of 2L values
(flat index ``2*layer + kind`` like :class:`~surgery.mask.KeepMask`), or of shape ``(batch, 2L)`` for one gate
pattern per sequence of the batch. Gates are forward hooks on the module
whose output joins the residual stream (the attention module, the family's last FFN module, e.g. OPT's
``fc2``, or the sublayer's post-norm when it has one, as Gemma2 does), so they work for every family in
:data:`~surgery.families.FAMILIES` and gradients flow into ``values``. Leaving the block removes the hooks
and puts back any runtime mask that was active: the model is exactly as before.

A gate of 1 multiplies by one (bit-identical to the dense model); a gate of 0 adds zeros, like a removed
sublayer under :func:`surgery.masking.masked` (the sublayer is still computed, only its output is dropped).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .families import Family, family_for, get_path
from .mask import ATTN, KeepMask
from .masking import masker_for


def residual_writer(family: Family, layer: nn.Module, kind: int) -> nn.Module:
    """The module whose output a sublayer adds to the residual stream.

    A sublayer with two norms has a pre-norm and a post-norm (the second, applied to the module's output):
    the gate must follow the post-norm, which would otherwise normalise the gate away.
    """
    norms = family.attn_norms if kind == ATTN else family.ffn_norms
    if len(norms) == 2:
        return getattr(layer, norms[1])
    return getattr(layer, family.attn if kind == ATTN else family.ffn[-1])


class SublayerGates:
    """Forward hooks that multiply each sublayer's residual contribution by ``values[2*layer + kind]``."""

    def __init__(self, model: nn.Module, values: torch.Tensor | None = None):
        self.model = model
        self.family = family_for(model.config)
        layers = get_path(model, self.family.layers)
        self.num_sublayers = 2 * len(layers)
        self.values = torch.ones(self.num_sublayers) if values is None else values
        self._layers = layers
        self._handles: list = []
        self._previous_mask: KeepMask | None = None

    def _hook(self, index: int):
        def scale(module, args, output):
            gate = self.values[..., index]
            if gate.dim() == 1:  # one gate per sequence: broadcast over positions and features
                gate = gate.view(-1, *[1] * ((output[0] if isinstance(output, tuple) else output).dim() - 1))
            if isinstance(output, tuple):  # attention returns (output, weights, ...)
                return (output[0] * gate.to(output[0].dtype), *output[1:])
            return output * gate.to(output.dtype)

        return scale

    def attach(self) -> SublayerGates:
        """Register the hooks (on the dense modules: an active runtime mask is lifted until :meth:`detach`)."""
        if self._handles:
            raise RuntimeError("gates are already attached")
        if self.values.shape[-1] != self.num_sublayers:
            raise ValueError(
                f"gate values have {self.values.shape[-1]} entries; the model has {self.num_sublayers} sublayers"
            )
        masker = masker_for(self.model)
        self._previous_mask = masker.current
        masker.restore()
        for index in range(self.num_sublayers):
            layer, kind = divmod(index, 2)
            module = residual_writer(self.family, self._layers[layer], kind)
            self._handles.append(module.register_forward_hook(self._hook(index)))
        return self

    def detach(self) -> None:
        """Remove every hook and re-apply the runtime mask that was active before :meth:`attach`."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._previous_mask is not None:
            masker_for(self.model).apply(self._previous_mask)
            self._previous_mask = None

    def __enter__(self) -> SublayerGates:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()


def mask_values(mask: KeepMask) -> torch.Tensor:
    """Hard 0/1 gate values of a keep-mask."""
    return torch.tensor([float(bit) for bit in mask.bits])


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Every parameter's ``requires_grad`` off inside the block, each one's previous flag restored afterwards.

    Sublayers swapped out by an active runtime mask are included: gates put them back into the model.
    """
    masker = model.__dict__.get("_depthsearch_masker")
    swapped = [m for pair in masker.originals for part in pair for m in part.values()] if masker else []
    params = {id(p): p for module in [model, *swapped] for p in module.parameters()}
    flags = [(p, p.requires_grad) for p in params.values()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


__all__ = ["SublayerGates", "frozen", "mask_values", "residual_writer"]
