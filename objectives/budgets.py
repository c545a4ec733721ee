"""Budgets: additive cost tables over sublayers (parameters, KV-cache bytes, sublayer count, ...).

Every budget is ``cost(mask) = fixed + sum of the kept sublayers' costs``; that is exact for parameters and
KV bytes and is the latency model's assumption. A budget target is the fraction of the dense cost removed.
A new budget is one builder function plus one registry entry.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from surgery.families import family_for, get_path, kv_shape
from surgery.mask import KeepMask
from surgery.masking import masked
from surgery.params import num_params

from .costs import BudgetError, CostTable, budget_excess
from .latency import latency_decode_costs, latency_prefill_costs
from .registry import Registry

__all__ = ["BUDGETS", "BudgetError", "CostTable", "budget_excess", "kv_cache_costs", "param_costs", "sublayer_costs"]


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
BUDGETS: Registry[BudgetBuilder] = Registry("budget")
BUDGETS.add("params", param_costs)
BUDGETS.add("kv_cache_bytes", kv_cache_costs)
BUDGETS.add("sublayers", sublayer_costs)
BUDGETS.add("latency_prefill_ms", latency_prefill_costs)  # measured on the study's device (objectives.latency)
BUDGETS.add("latency_decode_ms", latency_decode_costs)
