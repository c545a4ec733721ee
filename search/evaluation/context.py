"""What a strategy sees: the run object (:class:`StrategyRun`) over one study's shared :class:`SearchContext`.

Every full evaluation of a mask is recorded in the study record (``search.record``) as a trial of the strategy
that asked for it, one by one as they finish, so a killed study loses no completed trial; on resume a strategy
asking for a mask it already evaluated gets the stored value back without a forward pass. Strategies use only
the run's public API: ``evaluate`` / ``evaluate_many`` (and ``partial`` / ``partial_many`` for staged selection),
``note``, ``targets``, ``budget`` / ``feasible``, ``scorer``, ``evaluated`` (every strategy's masks so far),
``working_study`` and, with ``executor: ray``, ``tune_trials``; ``evaluations`` and ``forwards`` are its progress.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Iterable

import optuna

from objectives.budgets import CostTable, budget_excess
from objectives.scorer import MaskScorer
from search.evaluation.engine import Staging, staged_survivors
from search.evaluation.evaluator import Evaluator
from search.record import StudyRecord
from surgery.mask import KeepMask

if TYPE_CHECKING:
    from search.evaluation.tune import TuneRunner


@dataclass(frozen=True)
class Budget:
    """The budget metric, the targets (fractions of its dense cost removed) and the extra constraints
    ((metric, max fraction of dense kept), for every mask)."""

    costs: CostTable
    targets: tuple[float, ...]
    constraints: tuple[tuple[CostTable, float], ...] = ()

    def excess(self, mask: KeepMask, target: float) -> float:
        """0 when ``mask`` meets ``target`` and every constraint; else the largest excess (fraction of dense)."""
        return budget_excess(self.costs, mask, target, self.constraints)

    def feasible(self, mask: KeepMask, target: float) -> bool:
        return self.excess(mask, target) == 0.0


@dataclass
class SearchContext:
    """Shared by all strategies of one study run."""

    scorer: MaskScorer
    costs: CostTable  # the budget metric: targets are fractions of its dense cost removed
    targets: tuple[float, ...]
    record: StudyRecord
    seed: int = 0
    extra_costs: tuple[CostTable, ...] = ()  # other metrics recorded on every trial
    constraints: tuple[tuple[CostTable, float], ...] = ()  # (metric, max fraction of dense kept) for all masks
    evaluator: Evaluator | None = None  # batch scorer (engine, executors); None: the scorer's plain loop
    staging: Staging | None = None  # staged selection in evaluate_many (None: exact, the default)
    racing: bool = False  # exact racing in evaluate_many: masks proven worse than the best are not finished
    select_strategies: tuple[str, ...] | None = None  # override of the tags staging/racing apply to (empty: all;
    # None: the strategies whose class declares ``selection_only``)
    tune: TuneRunner | None = None  # executor ray: an Optuna sampler's trials as Ray Tune trials
    values: dict[str, float] = field(default_factory=dict)  # mask text -> full objective value
    recorded: dict[str, set[str]] = field(default_factory=dict)  # strategy -> masks it has trials for

    def __post_init__(self) -> None:
        for done in self.record.evaluations():
            self.values.setdefault(done.mask, done.objective)
            self.recorded.setdefault(done.strategy, set()).add(done.mask)

    @property
    def study(self) -> optuna.Study:
        """The main Optuna study (read-only use: every write goes through the record)."""
        return self.record.study

    @cached_property
    def budget(self) -> Budget:
        return Budget(self.costs, self.targets, self.constraints)

    @property
    def num_layers(self) -> int:
        return self.scorer.num_layers

    def dense(self) -> KeepMask:
        return KeepMask.dense(self.num_layers)

    def feasible(self, mask: KeepMask, target: float) -> bool:
        """Meets the budget target and every extra constraint."""
        return self.budget.feasible(mask, target)

    def cost_attrs(self, mask: KeepMask) -> dict[str, float]:
        return {table.name: table.cost(mask) for table in (self.costs, *self.extra_costs)}

    def strategy_run(self, name: str, *, selection_only: bool = False) -> StrategyRun:
        """A run recorded under tag ``name``; ``selection_only``: the strategy class's declaration
        (``Strategy.selection_only``), which decides where staging and racing apply."""
        return StrategyRun(self, name, selection_only=selection_only)


@dataclass
class StrategyRun:
    """One strategy's view of the context: evaluations are counted, cached and recorded under its name."""

    ctx: SearchContext
    strategy: str
    selection_only: bool = False  # the strategy's batches only pick their best (Strategy.selection_only)
    evaluations: int = 0  # distinct full evaluations asked for (cached ones included)
    forwards: int = 0  # sequences actually forwarded, partial stages included
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    _recorded: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._recorded = self.ctx.recorded.setdefault(self.strategy, set())  # shared: trials read once per study

    # what the strategy reads -----------------------------------------------------------------------------
    @property
    def seed(self) -> int:
        return self.ctx.seed

    @property
    def num_layers(self) -> int:
        return self.ctx.num_layers

    @property
    def scorer(self) -> MaskScorer:
        """The calibration scorer (model, token batch, objective) for strategies that look inside the model."""
        return self.ctx.scorer

    @property
    def targets(self) -> tuple[float, ...]:
        """The budget targets as configured (fractions of the budget metric's dense cost removed)."""
        return self.ctx.targets

    @property
    def budget(self) -> Budget:
        return self.ctx.budget

    def feasible(self, mask: KeepMask, target: float) -> bool:
        """Meets the budget target and every extra constraint."""
        return self.ctx.budget.feasible(mask, target)

    def dense(self) -> KeepMask:
        return self.ctx.dense()

    def evaluated(self) -> list[tuple[KeepMask, float]]:
        """Every distinct mask of this model evaluated in the study so far (any strategy), best first."""
        values = self.ctx.values
        ordered = sorted(values, key=lambda text: (values[text], text))
        masks = [(KeepMask.parse(text), values[text]) for text in ordered]
        return [(m, v) for m, v in masks if m.num_layers == self.num_layers]

    def found_by(self, mask: KeepMask) -> list[str]:
        """The other strategies of the study that recorded ``mask`` (where a warm start comes from)."""
        text = str(mask)
        return sorted(tag for tag, masks in self.ctx.recorded.items() if tag != self.strategy and text in masks)

    def note(self, message: str) -> None:
        self.notes.append(message)

    # samplers ---------------------------------------------------------------------------------------------
    def working_study(self, name: str, sampler: optuna.samplers.BaseSampler, directions: list[str]) -> optuna.Study:
        """A sampler's own study ``depthsearch:<name>`` beside the main one (resumed when it exists)."""
        return self.ctx.record.working_study(name, sampler, directions)

    def running_trials(self, study: optuna.Study) -> list[optuna.Trial]:
        """A working study's trials left RUNNING by a killed run, to finish in place (exact resume)."""
        return self.ctx.record.running_trials(study)

    @property
    def tunes(self) -> bool:
        """Whether sampler trials run as Ray Tune trials (``executor: ray``): see :meth:`tune_trials`."""
        return self.ctx.tune is not None

    def tune_trials(self, study: optuna.Study, **options) -> None:
        """Run a sampler's remaining trials as Ray Tune trials (``search.evaluation.tune.TuneRunner``)."""
        self.ctx.tune(self, study, storage=self.ctx.record.storage, **options)

    def has_recorded(self, mask: KeepMask) -> bool:
        """Whether this strategy already recorded ``mask`` as a trial of the main study (this run or an earlier one)."""
        return str(mask) in self._recorded

    def record_scored(self, mask: KeepMask, value: float, target: float | None) -> float:
        """A full objective computed elsewhere (a Tune worker): cached and recorded like an evaluation."""
        self.ctx.values.setdefault(str(mask), float(value))
        return self.evaluate(mask, target)

    # evaluating -------------------------------------------------------------------------------------------
    def evaluate(self, mask: KeepMask, target: float | None = None) -> float:
        """Full-calibration objective of ``mask`` (cached; recorded as a trial of this strategy)."""
        return self._full([mask], target)[0]

    def evaluate_many(self, masks: Iterable[KeepMask], target: float | None = None) -> list[float]:
        """Full objective of each mask, in order; the context's evaluator batches them (prefix reuse, workers).

        For strategies whose batches only feed an argmin (``selection_only``): with ``ctx.racing`` masks
        proven worse than the best come back as ``inf`` (same best mask and value as the plain loop); with
        ``ctx.staging`` only the best ``staging.keep`` masks on a few sequences are finished, the rest ``inf``.
        Only finished masks are recorded as trials.
        """
        masks = list(masks)
        distinct = list(dict.fromkeys(masks))
        fresh = [m for m in distinct if str(m) not in self.ctx.values]
        if len(fresh) < 2 or not self._selects():
            return self._full(masks, target)
        if self.ctx.staging is not None and len(fresh) > self.ctx.staging.keep:
            scores = self.partial_many(fresh, self.ctx.staging.sequences)
            best = {fresh[i] for i in staged_survivors(scores, self.ctx.staging.keep)}
        elif self.ctx.racing and self.ctx.evaluator is not None and self.ctx.evaluator.races:
            known = [self.ctx.values[str(m)] for m in distinct if m not in fresh]
            raced = self._counted(lambda: self.ctx.evaluator.race(fresh, min(known, default=math.inf)))
            self.ctx.values.update((str(m), v) for m, v in zip(fresh, raced) if math.isfinite(v))
            best = {m for m, v in zip(fresh, raced) if math.isfinite(v)}
        else:
            return self._full(masks, target)
        chosen = [m for m in distinct if m in best or m not in fresh]  # known values are free
        values = dict(zip(chosen, self._full(chosen, target)))
        return [values.get(m, math.inf) for m in masks]

    def partial(self, mask: KeepMask, sequences: int) -> float:
        """Objective on the first ``sequences`` calibration sequences only (not recorded; for staged selection)."""
        if sequences >= len(self.ctx.scorer.input_ids):
            return self.evaluate(mask)
        return self.partial_many([mask], sequences)[0]

    def partial_many(self, masks: Iterable[KeepMask], sequences: int) -> list[float]:
        """:meth:`partial` of each mask, batched through the context's evaluator."""
        masks = list(masks)
        sequences = min(sequences, len(self.ctx.scorer.input_ids))
        if self.ctx.evaluator is None:
            self.forwards += sequences * len(masks)
            return [self.ctx.scorer.score(mask, sequences=sequences) for mask in masks]
        return self._counted(lambda: self.ctx.evaluator.score_many(masks, sequences))

    def _selects(self) -> bool:
        chosen = self.ctx.select_strategies
        if chosen is None:
            return self.selection_only
        return not chosen or self.strategy in chosen

    def _counted(self, score) -> list[float]:
        """Run an evaluator call, counting the sequences it really forwarded."""
        counters = self.ctx.evaluator.counters
        before = counters.head_forwards
        values = score()
        self.forwards += counters.head_forwards - before
        return values

    def _full(self, masks: list[KeepMask], target: float | None) -> list[float]:
        """Full objectives: computed once per distinct mask, recorded once per strategy."""
        missing = [m for m in dict.fromkeys(masks) if str(m) not in self.ctx.values]
        if missing and self.ctx.evaluator is None:
            values = [self.ctx.scorer.score(mask) for mask in missing]
            self.forwards += len(self.ctx.scorer.input_ids) * len(missing)
        elif missing:
            values = self._counted(lambda: self.ctx.evaluator.score_many(missing))
        self.ctx.values.update((str(m), v) for m, v in zip(missing, values if missing else ()))
        result = []
        for mask in masks:
            self.evaluations += 1
            if str(mask) not in self._recorded:
                self._record(mask, self.ctx.values[str(mask)], target)
            result.append(self.ctx.values[str(mask)])
        return result

    def _record(self, mask: KeepMask, value: float, target: float | None) -> None:
        self.ctx.record.add_evaluation(self.strategy, mask, value, target, self.ctx.cost_attrs(mask),
                                       self.ctx.costs.name)
        self._recorded.add(str(mask))

    @property
    def wall_s(self) -> float:
        return time.perf_counter() - self.started
