"""Ray Tune: an Optuna sampler's trials (TPE, random, NSGA-II) as Ray Tune trials (OptunaSearch).

Each Tune trial scores one mask on a worker that loads the model once (``search.evaluation.workers``), with
the budget excess as the trial's constraint; :class:`TuneRunner` records the results in both the main study
(through the strategy's run) and the sampler's working study, so a re-run counts them and resumes.
"""

from __future__ import annotations

import copyreg
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import optuna

from objectives.budgets import CostTable, budget_excess
from search.config import StudyConfig
from search.evaluation.evaluator import Evaluator
from search.evaluation.workers import WorkerState, ray_options, ray_session
from search.record import (
    BUDGET_CONSTRAINT, PENALTY, completed, keep_params, mask_from_params, planned_mask, suggest_mask,
)
from surgery.mask import KeepMask

if TYPE_CHECKING:
    from search.evaluation.context import StrategyRun

_TUNE_STATE: dict[str, WorkerState] = {}  # per Tune worker process (reuse_actors keeps the process)


@dataclass(frozen=True)
class TuneBudget:
    """The budget a Tune trial's mask must meet: the target and the context's extra constraints."""

    costs: CostTable
    target: float
    constraints: tuple[tuple[CostTable, float], ...] = ()

    def excess(self, mask: KeepMask) -> float:
        return budget_excess(self.costs, mask, self.target, self.constraints)


class KeepSpace:
    """OptunaSearch's define-by-run space: one 0/1 keep bit per sublayer, and the budget excess as the trial's
    constraint (as in-process sampling sets it), so constrained samplers see it (a class, so Tune can pickle it)."""

    def __init__(self, budget: TuneBudget):
        self.budget = budget

    def __call__(self, trial) -> None:
        mask = suggest_mask(trial, len(self.budget.costs.per_sublayer))
        trial.set_constraint(BUDGET_CONSTRAINT, self.budget.excess(mask))


def _tune_trial(params: dict, *, config: StudyConfig, budget: TuneBudget) -> dict:
    costs = budget.costs
    mask = mask_from_params(params, len(costs.per_sublayer))
    result = {"mask": str(mask), "kept": costs.cost(mask) / costs.dense, "feasible": budget.excess(mask) == 0.0}
    if not result["feasible"]:
        return {**result, "objective": PENALTY}
    key = config.model_dump_json()
    if key not in _TUNE_STATE:
        _TUNE_STATE[key] = WorkerState(config, int(config.executor.resources_per_worker.get("CPU", 1)) or 1)
    value = _TUNE_STATE[key].score([str(mask)], None)[0][0]
    return {**result, "objective": value, "pid": os.getpid()}


_LOCKS = {type(threading.Lock()): "Lock", type(threading.RLock()): "RLock"}  # lock type -> its maker in threading


def _with_locks(cls: type, state: dict, locks: dict[str, str]):
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    obj.__dict__.update({name: getattr(threading, kind)() for name, kind in locks.items()})
    return obj


def _reduce_without_locks(obj):
    state = {k: v for k, v in vars(obj).items() if type(v) not in _LOCKS}
    locks = {k: _LOCKS[type(v)] for k, v in vars(obj).items() if type(v) in _LOCKS}
    return _with_locks, (type(obj), state, locks)


def picklable(sampler: optuna.samplers.BaseSampler) -> optuna.samplers.BaseSampler:
    """``sampler``, whose class pickles without its thread locks (made anew when unpickled): Ray Tune pickles its
    search algorithm with the sampler, and some samplers hold a lock (optuna 5.1's NSGA-II)."""
    if any(type(v) in _LOCKS for v in vars(sampler).values()):
        copyreg.pickle(type(sampler), _reduce_without_locks)
    return sampler


def tune_sampler(config: StudyConfig, *, budget: TuneBudget, sampler, n_trials: int,
                 warm_start: Sequence[KeepMask] = (), metrics: Sequence[str] = ("objective",),
                 storage_path: str | None = None, study: optuna.Study | None = None,
                 storage: optuna.storages.BaseStorage | None = None) -> list[dict]:
    """Run ``n_trials`` masks proposed by ``sampler`` (OptunaSearch; minimising ``metrics``, several for a
    multi-objective sampler) as Ray Tune trials on ``executor.workers`` workers (each loads the model once);
    returns each finished trial's result dict (objective, kept, mask, feasible). A trial whose worker dies is
    retried (``FailureConfig(max_failures=2)``). With ``study`` (in ``storage``), OptunaSearch asks and tells
    in that study, so each trial is stored the moment it finishes and the sampler sees the study's earlier trials."""
    ray_session(config.executor.address)
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    points = [keep_params(m) for m in warm_start]
    metric, mode = (metrics[0], "min") if len(metrics) == 1 else (list(metrics), ["min"] * len(metrics))
    stored = {"study_name": study.study_name, "storage": storage} if study is not None else {}
    search = OptunaSearch(space=KeepSpace(budget), metric=metric, mode=mode, sampler=picklable(sampler),
                          points_to_evaluate=points or None, **stored)
    options = ray_options(config.executor.resources_per_worker)
    resources = {"cpu": options["num_cpus"], "gpu": options["num_gpus"], **options.get("resources", {})}
    trainable = tune.with_resources(tune.with_parameters(_tune_trial, config=config, budget=budget), resources)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=search, num_samples=n_trials, reuse_actors=True,
                                    max_concurrent_trials=config.executor.workers),
        run_config=tune.RunConfig(storage_path=storage_path, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=2)),
    )
    return [result.metrics for result in tuner.fit() if result.error is None]


def record_working_trials(run: StrategyRun, study: optuna.Study, target_of: Callable[[KeepMask], float | None]
                          ) -> list[tuple[KeepMask, float]]:
    """Record the feasible completed trials of the working study ``study`` (scored by Tune workers) that ``run``'s
    strategy has not recorded yet as its trials in the main study (no forward pass), each under the target
    ``target_of(mask)``; returns them with their values."""
    sublayers = 2 * run.num_layers
    finished = []
    for trial in completed(study):
        mask = planned_mask(trial, sublayers)
        if mask is None or run.has_recorded(mask) or trial.values[0] >= PENALTY:  # PENALTY: over the budget
            continue
        finished.append((mask, run.record_scored(mask, trial.values[0], target_of(mask))))
    return finished


class TuneRunner:
    """An Optuna sampler's remaining trials as Ray Tune trials; results land in both studies.

    OptunaSearch asks and tells in the strategy's working study (in the study's storage), so every Tune trial is
    stored as soon as it finishes: a killed run loses none, and its re-run counts them and resumes. The main
    study gets every feasible one as a trial of the strategy (no forward pass in this process), before the Tune
    trials (the ones a killed run finished) and after. Tune's own files go to ``<output_dir>/tune``.
    """

    def __init__(self, config: StudyConfig, evaluator: Evaluator):
        self.config = config
        self.evaluator = evaluator  # the study's Ray actors: closed while Tune trials need their resources

    def __call__(self, run: StrategyRun, study: optuna.Study, *, storage: optuna.storages.BaseStorage, sampler,
                 target: float, n_trials: int, warm_start: Sequence[KeepMask],
                 objectives: Sequence[str] = ("objective",),
                 record_target: Callable[[KeepMask], float | None] | None = None) -> None:
        """Run ``n_trials`` of ``sampler`` in the working study ``study`` (in ``storage``) as Tune trials."""
        target_of = record_target or (lambda mask: target)
        record_working_trials(run, study, target_of)
        self.evaluator.close()  # the Tune trials need the workers' resources
        budget = TuneBudget(run.budget.costs, target, tuple(run.budget.constraints))
        tune_sampler(self.config, budget=budget, sampler=sampler, n_trials=n_trials, warm_start=warm_start,
                     metrics=objectives, storage_path=str(Path(self.config.output_dir, "tune").resolve()),
                     study=study, storage=storage)
        record_working_trials(run, study, target_of)
