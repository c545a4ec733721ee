"""What a strategy sees: scoring, budgets, and the one Optuna study every evaluation is recorded in.

Every full evaluation of a mask becomes a COMPLETE trial of the main study, values ``[objective, cost]``
(cost on the budget metric), params ``keep_i`` (0/1 per flat sublayer, so Optuna samplers learn from every
strategy's trials) and user attrs ``strategy``, ``mask``, ``removed_attn``, ``removed_ffn`` and each cost.
Trials are written one by one as they finish, so a killed study loses no completed trial; on resume a
strategy asking for a mask it already evaluated gets the stored value back without a forward pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable

import optuna
from optuna.distributions import IntDistribution

from objectives.budgets import CostTable
from objectives.scorer import MaskScorer
from surgery.mask import KeepMask

MAIN_STUDY = "depthsearch"


def keep_params(mask: KeepMask) -> dict[str, int]:
    return {f"keep_{i}": int(bit) for i, bit in enumerate(mask.bits)}


def keep_distributions(num_sublayers: int) -> dict[str, IntDistribution]:
    return {f"keep_{i}": IntDistribution(0, 1) for i in range(num_sublayers)}


@dataclass
class SearchContext:
    """Shared by all strategies of one study run."""

    scorer: MaskScorer
    costs: CostTable  # the budget metric: targets are fractions of its dense cost removed
    targets: tuple[float, ...]
    study: optuna.Study
    seed: int = 0
    extra_costs: tuple[CostTable, ...] = ()  # other metrics recorded on every trial
    constraints: tuple[tuple[CostTable, float], ...] = ()  # (metric, max fraction of dense kept) for all masks
    _values: dict[str, float] = field(default_factory=dict)  # mask text -> full objective value

    def __post_init__(self) -> None:
        for trial in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            self._values.setdefault(trial.user_attrs["mask"], trial.values[0])

    @property
    def num_layers(self) -> int:
        return self.scorer.num_layers

    def dense(self) -> KeepMask:
        return KeepMask.dense(self.num_layers)

    def feasible(self, mask: KeepMask, target: float) -> bool:
        """Meets the budget target and every extra constraint."""
        if not self.costs.feasible(mask, target):
            return False
        return all(table.cost(mask) <= kept * table.dense + 1e-9 for table, kept in self.constraints)

    def cost_attrs(self, mask: KeepMask) -> dict[str, float]:
        return {table.name: table.cost(mask) for table in (self.costs, *self.extra_costs)}

    def strategy_run(self, name: str) -> StrategyRun:
        return StrategyRun(self, name)


@dataclass
class StrategyRun:
    """One strategy's view of the context: evaluations are counted, cached and recorded under its name."""

    ctx: SearchContext
    strategy: str
    evaluations: int = 0  # distinct full evaluations asked for (cached ones included)
    forwards: int = 0  # sequences actually forwarded, partial stages included
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    _recorded: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        for trial in self.ctx.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if trial.user_attrs.get("strategy") == self.strategy:
                self._recorded.add(trial.user_attrs["mask"])

    @property
    def seed(self) -> int:
        return self.ctx.seed

    @property
    def num_layers(self) -> int:
        return self.ctx.num_layers

    def note(self, message: str) -> None:
        self.notes.append(message)

    def evaluate(self, mask: KeepMask, target: float | None = None) -> float:
        """Full-calibration objective of ``mask`` (cached; recorded as a trial of this strategy)."""
        key = str(mask)
        if key not in self.ctx._values:
            self.ctx._values[key] = self.ctx.scorer.score(mask)
            self.forwards += len(self.ctx.scorer.input_ids)
        self.evaluations += 1
        if key not in self._recorded:
            self._record(mask, self.ctx._values[key], target)
        return self.ctx._values[key]

    def evaluate_many(self, masks: Iterable[KeepMask], target: float | None = None) -> list[float]:
        """Full objective of each mask, in order (the fast engine may batch or reuse prefixes here)."""
        return [self.evaluate(mask, target) for mask in masks]

    def partial(self, mask: KeepMask, sequences: int) -> float:
        """Objective on the first ``sequences`` calibration sequences only (not recorded; for staged selection)."""
        if sequences >= len(self.ctx.scorer.input_ids):
            return self.evaluate(mask)
        self.forwards += sequences
        return self.ctx.scorer.score(mask, sequences=sequences)

    def _record(self, mask: KeepMask, value: float, target: float | None) -> None:
        costs = self.ctx.cost_attrs(mask)
        attrs = {
            "strategy": self.strategy,
            "mask": str(mask),
            "target": target,
            "removed_attn": mask.removed_attn,
            "removed_ffn": mask.removed_ffn,
            **costs,
        }
        trial = optuna.trial.create_trial(
            params=keep_params(mask),
            distributions=keep_distributions(len(mask.bits)),
            values=[value, costs[self.ctx.costs.name]],
            user_attrs=attrs,
        )
        self.ctx.study.add_trial(trial)
        self._recorded.add(str(mask))

    @property
    def wall_s(self) -> float:
        return time.perf_counter() - self.started
