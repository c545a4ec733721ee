"""Budgets: additive cost tables over sublayers (parameters, KV-cache bytes, sublayer count, ...).

Every budget is ``cost(mask) = fixed + sum of the kept sublayers' costs``; that is exact for parameters and
KV bytes and is the latency model's assumption. A budget target is the fraction of the dense cost removed.
A new budget is one builder function plus one registry entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from surgery.families import family_for, get_path, kv_shape
from surgery.mask import KeepMask
from surgery.masking import masked

from .registry import Registry
from surgery.errors import UserError


class BudgetError(UserError):
    """A budget target no mask can meet, or an unknown budget."""


@dataclass(frozen=True)
class CostTable:
    """Additive cost model: ``fixed`` plus ``per_sublayer[i]`` for each kept flat sublayer i."""

    name: str
    unit: str
    fixed: float
    per_sublayer: tuple[float, ...]

    def cost(self, mask: KeepMask) -> float:
        return self.fixed + sum(c for c, keep in zip(self.per_sublayer, mask.bits) if keep)

    @property
    def dense(self) -> float:
        return self.fixed + sum(self.per_sublayer)

    def removed_fraction(self, mask: KeepMask) -> float:
        """Fraction of the dense cost this mask removes."""
        return 1.0 - self.cost(mask) / self.dense if self.dense else 0.0

    def limit(self, target: float) -> float:
        """Largest allowed cost for a target fraction removed (checked against what removing all allows)."""
        if not 0.0 <= target < 1.0:
            raise BudgetError(f"{self.name} target {target} must be a fraction removed in [0, 1)")
        limit = (1.0 - target) * self.dense
        if self.fixed > limit + 1e-9:
            best = 1.0 - self.fixed / self.dense
            raise BudgetError(
                f"{self.name} target {target:.0%} removed is infeasible: removing every sublayer removes only "
                f"{best:.1%} of {self.dense:g} {self.unit}"
            )
        return limit

    def feasible(self, mask: KeepMask, target: float) -> bool:
        return self.cost(mask) <= self.limit(target) + 1e-9


def budget_excess(costs: CostTable, mask: KeepMask, target: float,
                  constraints: Sequence[tuple[CostTable, float]] = ()) -> float:
    """0 when ``mask`` meets ``target`` and every extra constraint (metric, largest fraction of dense kept); else
    the largest excess, as a fraction of that metric's dense cost (a constraint value for Optuna's samplers)."""
    excess = [(costs.cost(mask) - costs.limit(target) - 1e-9) / costs.dense]
    excess += [(table.cost(mask) - kept * table.dense - 1e-9) / table.dense for table, kept in constraints]
    return max(0.0, *excess)


def _num_params(modules) -> int:
    seen: dict[int, int] = {}
    for module in modules:
        for p in module.parameters():
            seen[id(p)] = p.numel()
    return sum(seen.values())


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
        per_sublayer += [_num_params(attn), _num_params(ffn)]
    total = _num_params([model])
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


def _latency_budget(phase: str) -> BudgetBuilder:
    def build(model: nn.Module, settings=None, **kwargs) -> CostTable:
        from .latency import latency_costs  # lazy: profiling needs the model on its device

        return latency_costs(model, phase, settings, **kwargs)

    build.__doc__ = f"Measured {phase} milliseconds per kept sublayer (objectives.latency); settings: config latency:"
    return build


BUDGETS.add("latency_prefill_ms", _latency_budget("prefill"))
BUDGETS.add("latency_decode_ms", _latency_budget("decode"))
