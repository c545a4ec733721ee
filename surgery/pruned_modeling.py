"""Stand-ins for removed sublayers, and the model class of exported partially-pruned models.

This file imports only torch and transformers: the export copies it next to the weights so that
``from_pretrained(..., trust_remote_code=True)`` works without this package installed.
"""

from __future__ import annotations

import torch
from torch import nn


class SkippedAttention(nn.Module):
    """A removed attention sublayer: adds nothing to the residual stream, computes nothing, holds no weights."""

    def forward(self, hidden_states=None, *args, **kwargs):
        if hidden_states is None:
            hidden_states = args[0]
        return torch.zeros_like(hidden_states), None


class SkippedFFN(nn.Module):
    """A removed FFN sublayer (or one of its parts): returns zeros with ``out_features`` last dim.

    For FFNs made of several modules (OPT's fc1 -> act -> fc2) the inner parts return an empty last dim, so no
    compute or memory is spent; the last part returns zeros of the hidden size.
    """

    def __init__(self, out_features: int | None = None):
        super().__init__()
        self.out_features = out_features

    def forward(self, hidden_states, *args, **kwargs):
        width = hidden_states.shape[-1] if self.out_features is None else self.out_features
        return hidden_states.new_zeros(*hidden_states.shape[:-1], width)

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}"
