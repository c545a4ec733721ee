"""Helpers shared by the strategy modules: setting types, budget bookkeeping, paths of removals."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Iterable, Sequence

from pydantic import Field, Strict

from surgery.mask import KeepMask

if TYPE_CHECKING:
    from search.evaluation.context import StrategyRun

Results = dict[float, KeepMask | None]


# settings ------------------------------------------------------------------------------------------------
INT_MAX = 10_000_000  # every whole-number setting's upper bound (trials, generations, samples, masks)
SEED_MAX = 2**32 - 1  # a ``seed`` setting's


# Setting types: a strategy's keyword-only ``__init__`` parameters are annotated with these (or a ``Literal`` of
# choices), and ``base.Strategy`` validates every call with pydantic (bools are not numbers, numbers are finite).
Count = Annotated[int, Strict(), Field(ge=1, le=INT_MAX)]
CountOrZero = Annotated[int, Strict(), Field(ge=0, le=INT_MAX)]
Population = Annotated[int, Strict(), Field(ge=2, le=INT_MAX)]
Seed = Annotated[int, Strict(), Field(ge=0, le=SEED_MAX)] | None  # None: the study seed
Fraction = Annotated[float, Strict(), Field(ge=0.0, lt=1.0)]  # [0, 1)
ClosedFraction = Annotated[float, Strict(), Field(ge=0.0, le=1.0)]  # [0, 1]
Positive = Annotated[float, Strict(), Field(gt=0.0, allow_inf_nan=False)]
Flag = Annotated[bool, Strict()]


def targets(run: StrategyRun) -> list[float]:
    """The run's budget targets, loosest (smallest fraction removed) first."""
    return sorted(run.targets)


def tightest_met(run: StrategyRun, mask: KeepMask) -> float | None:
    """The largest target ``mask`` meets (None when it meets none): the tag its evaluation is recorded under."""
    met = [t for t in run.targets if run.feasible(mask, t)]
    return max(met) if met else None


def next_unmet(run: StrategyRun, mask: KeepMask) -> float | None:
    """The loosest target ``mask`` does not meet yet (None when it meets all)."""
    unmet = [t for t in run.targets if not run.feasible(mask, t)]
    return min(unmet) if unmet else None


def first_feasible(run: StrategyRun, path: Sequence[KeepMask], why: str, finish=None) -> Results:
    """For each target, the first mask of a removal path that meets it, evaluated (so it is recorded);
    ``finish(mask, target)``, when given, turns it into the result (e.g. a refill of unused budget)."""
    results: Results = {}
    for target in targets(run):
        mask = next((m for m in path if run.feasible(m, target)), None)
        if mask is None:
            run.note(f"{run.strategy}: no mask for target {target:g} ({why})")
        else:
            run.evaluate(mask, target)
            mask = finish(mask, target) if finish else mask
        results[target] = mask
    return results


def prefix_path(num_layers: int, order: Iterable[int]) -> list[KeepMask]:
    """Dense mask, then whole layers removed cumulatively in ``order``."""
    removed: list[int] = []
    path = [KeepMask.dense(num_layers)]
    for layer in order:
        removed.append(layer)
        path.append(KeepMask.from_layers(num_layers, removed))
    return path


def known_feasible(run: StrategyRun, target: float, limit: int) -> list[KeepMask]:
    """Best ``limit`` distinct masks already evaluated in the study (any strategy) that meet ``target``."""
    return [m for m, _ in run.evaluated() if run.feasible(m, target)][:limit]


def note_warm_start(run: StrategyRun, target: float, mask: KeepMask) -> None:
    """Say which strategies found the mask a warm start begins from: their wall time is part of its cost."""
    origin = ", ".join(run.found_by(mask)) or "no other strategy"
    run.note(f"{run.strategy} target {target:g}: starts from {mask}, found by {origin}")


def argmin(values: Sequence[float]) -> int:
    """Index of the smallest value; ties go to the earliest (deterministic)."""
    return min(range(len(values)), key=lambda i: (values[i], i))
