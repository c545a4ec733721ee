"""Exact resume for Optuna samplers: trial N proposes the same mask in any process, and no trial stays RUNNING.

A seeded sampler's draws depend on how many draws its process made before, so a study killed after trial N and
re-run would continue with a fresh random state and propose other masks than an uninterrupted run.
:class:`ReplaySampler` wraps a sampler factory and seeds a sampler per draw from (seed, trial number, parameter):
what trial N proposes then depends only on the study's finished trials, which the storage holds.
:func:`finish_running` completes, in place, the trials a killed run left RUNNING (with their stored or re-drawn
parameters), so trial numbers and history match the uninterrupted run.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Any, Callable

import optuna
from optuna.samplers import BaseSampler



class ReplaySampler(BaseSampler):
    """``factory(seed)`` samplers, one per draw, seeded from (seed, trial number, parameter name)."""

    def __init__(self, factory: Callable[[int], BaseSampler], seed: int):
        self._factory, self._seed = factory, seed
        self._base = self._make(seed)  # search space and the before/after hooks (they keep no random state)

    def _make(self, seed: int) -> BaseSampler:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return self._factory(seed)

    def _for(self, trial, key: str) -> BaseSampler:
        digest = hashlib.sha256(f"{self._seed}:{trial.number}:{key}".encode()).digest()
        return self._make(int.from_bytes(digest[:4], "little"))

    def infer_relative_search_space(self, study, trial):
        return self._base.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space) -> dict[str, Any]:
        return self._for(trial, "").sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution) -> Any:
        return self._for(trial, param_name).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self._base.before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self._base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        """Nothing to reseed: every draw is seeded from the trial it belongs to."""


def finish_running(study: optuna.Study, running: list[optuna.Trial], objective) -> int:
    """Complete the RUNNING trials of ``study`` (left by a killed run; the caller owns the study) in place:
    ``objective`` sees their stored parameters (enqueued or already drawn) and draws the rest. ``running``: the
    trials as live ``optuna.Trial`` objects (``search.record.StudyRecord.running_trials``). Returns how many."""
    for trial in running:
        with warnings.catch_warnings():  # its budget constraint may be stored already: set again, same value
            warnings.filterwarnings("ignore", message="The constraint value is ignored")
            values = objective(trial)
        study.tell(trial, values)
    return len(running)
