"""Optuna samplers over the 2L keep bits: TPE and random (one working study per target) and NSGA-II (one
multi-objective working study, objective vs fraction of the dense cost kept, for all targets).

Working studies live in the main study's storage, named ``<main>:<strategy>:<target>`` (``<main>:<strategy>``
for NSGA-II), so re-running resumes them: ``n_trials`` counts the trials they already hold. Each is
warm-started (``enqueue_trial``) with the best masks of the main study that meet the target, whatever strategy
found them. The budget is a trial constraint (``trial.set_constraint``): a mask over it is not evaluated and
gets the value ``PENALTY``; every other mask goes through ``run.evaluate``, so it is recorded in the main study.
With ``executor: ray`` the same samplers propose masks for Ray Tune trials (``search.evaluation.tune.TuneRunner``).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import optuna

from search.record import PENALTY, keep_params, planned_mask, suggest_mask
from surgery.mask import KeepMask

from .replay import ReplaySampler, finish_running
from ._common import Count, CountOrZero, Flag, Population, Results, Seed, known_feasible, targets, tightest_met
from .base import Strategy, register

if TYPE_CHECKING:
    from search.evaluation.context import StrategyRun

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)


@contextlib.contextmanager
def quiet_optuna():
    """Silence Optuna's per-trial INFO lines while a working study runs."""
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


def violation(run: StrategyRun, mask: KeepMask, target: float) -> float:
    """0 when ``mask`` meets ``target`` and every extra constraint; else the largest excess (fraction of dense)."""
    return run.budget.excess(mask, target)


class OptunaSampling(Strategy):
    """Shared loop: working studies, warm start, resume, constraint handling."""

    def __init__(self, *, n_trials: Count = 150, warm_start: CountOrZero = 4, seed: Seed = None):
        self.n_trials, self.warm_start, self.seed = n_trials, warm_start, seed

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        raise NotImplementedError

    def expected_evaluations(self, ctx) -> int:
        """Upper bound (trials over the budget are not evaluated), for progress bars."""
        return (self.n_trials + 1) * len(ctx.targets)

    def working_study(self, run: StrategyRun, name: str, seed: int, directions: list[str]) -> optuna.Study:
        # trial N draws the same in any process: exact resume
        return run.working_study(name, ReplaySampler(self.sampler, seed), directions)

    def enqueue_known(self, run: StrategyRun, study: optuna.Study, target: float) -> None:
        sublayers = 2 * run.num_layers
        present = {planned_mask(t, sublayers) for t in study.get_trials(deepcopy=False)} - {None}
        for mask in known_feasible(run, target, self.warm_start):
            if mask not in present:
                study.enqueue_trial(keep_params(mask))
                present.add(mask)

    def optimize(self, run: StrategyRun, study: optuna.Study, objective) -> None:
        """Finish the trials a killed run left RUNNING, in place, then run the rest up to ``n_trials``."""
        with quiet_optuna():
            finish_running(study, run.running_trials(study), objective)
            done = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
            if done < self.n_trials:
                study.optimize(objective, n_trials=self.n_trials - done)

    def optimize_on_ray(self, run: StrategyRun, study: optuna.Study, target: float, seed: int, objective, *,
                        warm_start: list[KeepMask] | None = None, **options) -> None:
        """executor ray: the trials a killed run left RUNNING are finished in place (``objective``, as in
        :meth:`optimize`), the remaining ones run as Ray Tune trials (OptunaSearch with this sampler, asking and
        telling in ``study``), with ``target`` as the budget constraint, warm-started with ``warm_start``
        (default: the best known masks meeting ``target``) less the masks ``study`` already holds, at most as
        many as trials remain; ``options`` go to the tune hook (``search.evaluation.tune.TuneRunner``)."""
        with quiet_optuna():
            finish_running(study, run.running_trials(study), objective)
        remaining = self.n_trials - len(study.get_trials(deepcopy=False, states=FINISHED))
        if remaining > 0:
            if warm_start is None:
                warm_start = known_feasible(run, target, self.warm_start)
            present = {planned_mask(t, 2 * run.num_layers) for t in study.get_trials(deepcopy=False)}
            run.tune_trials(study, sampler=self.sampler(seed), target=target, n_trials=remaining,
                            warm_start=[m for m in warm_start if m not in present][:remaining], **options)

    @staticmethod
    def best_for(run: StrategyRun, study: optuna.Study, target: float) -> KeepMask | None:
        """Lowest-objective mask among the working study's completed trials that meets ``target``."""
        sublayers = 2 * run.num_layers
        best: tuple[float, int, KeepMask] | None = None
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            mask = planned_mask(trial, sublayers)
            if run.feasible(mask, target) and (best is None or (trial.values[0], trial.number) < best[:2]):
                best = (trial.values[0], trial.number, mask)
        if best is None:
            run.note(f"{run.strategy}: no trial met target {target:g}")
            return None
        run.evaluate(best[2], target)
        return best[2]


class PerTargetSampling(OptunaSampling):
    """Single-objective working study per target, the budget as constraint."""

    def search(self, run: StrategyRun) -> Results:
        seed = run.seed if self.seed is None else self.seed
        results: Results = {}
        for index, target in enumerate(targets(run)):
            study = self.working_study(run, f"{run.strategy}:{target:g}", seed + index, ["minimize"])
            if run.tunes:
                self.optimize_on_ray(run, study, target, seed + index,
                                     lambda trial, t=target: self._objective(run, trial, t))
            else:
                self.enqueue_known(run, study, target)
                self.optimize(run, study, lambda trial, t=target: self._objective(run, trial, t))
            results[target] = self.best_for(run, study, target)
        return results

    @staticmethod
    def _objective(run: StrategyRun, trial: optuna.Trial, target: float) -> float:
        mask = suggest_mask(trial, 2 * run.num_layers)
        excess = violation(run, mask, target)
        trial.set_constraint("budget", excess)
        return PENALTY if excess > 0 else run.evaluate(mask, target)


@register("tpe")
class TPE(PerTargetSampling):
    def __init__(self, *, n_trials: Count = 150, warm_start: CountOrZero = 4, n_startup_trials: CountOrZero = 20,
                 multivariate: Flag = True, seed: Seed = None):
        super().__init__(n_trials=n_trials, warm_start=warm_start, seed=seed)
        self.n_startup_trials, self.multivariate = n_startup_trials, multivariate

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=self.n_startup_trials, multivariate=self.multivariate
        )


@register("random")
class RandomSearch(PerTargetSampling):
    def sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        return optuna.samplers.RandomSampler(seed=seed)


@register("nsga2")
class NSGA2(OptunaSampling):
    """One multi-objective study (objective, fraction of the dense cost kept); the loosest target is the
    constraint; each target's answer is the best of its trials that meet it."""

    def __init__(self, *, n_trials: Count = 400, population_size: Population = 40, warm_start: CountOrZero = 4,
                 seed: Seed = None):
        super().__init__(n_trials=n_trials, warm_start=warm_start, seed=seed)
        self.population_size = population_size

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=self.population_size)

    def expected_evaluations(self, ctx) -> int:
        return self.n_trials + len(ctx.targets)

    def search(self, run: StrategyRun) -> Results:
        seed = run.seed if self.seed is None else self.seed
        study = self.working_study(run, run.strategy, seed, ["minimize", "minimize"])
        if run.tunes:
            warm = list(dict.fromkeys(m for t in targets(run) for m in known_feasible(run, t, self.warm_start)))
            self.optimize_on_ray(run, study, min(run.targets), seed, lambda trial: self._objective(run, trial),
                                 warm_start=warm,
                                 objectives=("objective", "kept"), record_target=lambda m: tightest_met(run, m))
        else:
            for target in targets(run):
                self.enqueue_known(run, study, target)
            self.optimize(run, study, lambda trial: self._objective(run, trial))
        return {target: self.best_for(run, study, target) for target in targets(run)}

    @staticmethod
    def _objective(run: StrategyRun, trial: optuna.Trial) -> tuple[float, float]:
        mask = suggest_mask(trial, 2 * run.num_layers)
        kept = run.budget.costs.cost(mask) / run.budget.costs.dense
        excess = violation(run, mask, min(run.targets))
        trial.set_constraint("budget", excess)
        return (PENALTY if excess > 0 else run.evaluate(mask, tightest_met(run, mask)), kept)
