"""Budgets: additive cost tables over sublayers (parameters, KV-cache bytes, sublayer count, ...).

Every budget is ``cost(mask) = fixed + sum of the kept sublayers' costs``; that is exact for parameters and
KV bytes and is the latency model's assumption. A budget target is the fraction of the dense cost removed.
A new budget is one builder function plus one registry entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from surgery.families import family_for, get_path, kv_shape
from surgery.mask import KeepMask
from surgery.masking import masked
from surgery.params import num_params

from .costs import BudgetError, CostTable, budget_excess
from .latency import latency_decode_costs, latency_prefill_costs
from .registry import Registry

__all__ = ["BUDGETS", "Budget", "BudgetError", "CostTable", "budget_excess", "kv_cache_costs", "param_costs",
           "sublayer_costs"]


def param_costs(model: nn.Module) -> CostTable:
    """Exact parameter counts: a sublayer owns its module(s) and the norms that feed only it."""
    family = family_for(model.config)
    layers = get_path(model, family.layers)
    with masked(model, KeepMask.dense(len(layers))):  # count the real modules even while a mask is applied
        return _param_table(model, family, layers)


def _param_table(model: nn.Module, family, layers) -> CostTable:
    per_sublayer: list[float] = []
    for layer in layers:
        attn = [getattr(layer, family.attn)] + [getattr(layer, n) for n in family.attn_norms]
        ffn = [getattr(layer, n) for n in family.ffn + family.ffn_norms]
        per_sublayer += [num_params(*attn), num_params(*ffn)]
    total = num_params(model)
    return CostTable("params", "parameters", float(total - sum(per_sublayer)), tuple(per_sublayer))


def kv_cache_costs(model: nn.Module) -> CostTable:
    """KV-cache bytes per token: 2 (K and V) x kv heads x head dim x dtype bytes, per kept attention."""
    kv_heads, head_dim = kv_shape(model.config)
    dtype_bytes = torch.finfo(next(model.parameters()).dtype).bits // 8
    per_attn = 2.0 * kv_heads * head_dim * dtype_bytes
    layers = len(get_path(model, family_for(model.config).layers))
    return CostTable("kv_cache_bytes", "bytes/token", 0.0, (per_attn, 0.0) * layers)


def sublayer_costs(model: nn.Module) -> CostTable:
    """Count of kept sublayers."""
    layers = len(get_path(model, family_for(model.config).layers))
    return CostTable("sublayers", "sublayers", 0.0, (1.0,) * (2 * layers))


BudgetBuilder = Callable[..., CostTable]


@dataclass(frozen=True)
class Budget:
    """A registered budget: its builder, and whether it is ``measured`` on the device. A measured budget takes the
    config's ``latency:`` settings and the study directory that keeps its profile; a dry run does not build it, and
    a study records it on trials only when the config asks for it."""

    build: BudgetBuilder
    measured: bool = False

    def __call__(self, model: nn.Module, **kwargs: Any) -> CostTable:
        return self.build(model, **kwargs)


BUDGETS: Registry[Budget] = Registry("budget")
BUDGETS.add("params", Budget(param_costs))
BUDGETS.add("kv_cache_bytes", Budget(kv_cache_costs))
BUDGETS.add("sublayers", Budget(sublayer_costs))
BUDGETS.add("latency_prefill_ms", Budget(latency_prefill_costs, measured=True))  # objectives.latency
BUDGETS.add("latency_decode_ms", Budget(latency_decode_costs, measured=True))
