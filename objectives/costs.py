"""The additive cost model every budget is: ``cost(mask) = fixed + sum of the kept sublayers' costs``.

Budget builders (``objectives.budgets``) and measured profiles (``objectives.latency``) both produce a
:class:`CostTable`; a budget target is the fraction of the dense cost removed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from surgery.errors import UserError
from surgery.mask import KeepMask


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
