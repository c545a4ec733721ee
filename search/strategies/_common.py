"""Helpers shared by the strategy modules: settings checks, budget bookkeeping, paths of removals."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterable, Sequence

from surgery.mask import KeepMask

from .base import StrategySettingsError

if TYPE_CHECKING:
    from search.evaluation.context import StrategyRun

Results = dict[float, KeepMask | None]


# settings ------------------------------------------------------------------------------------------------
INT_MAX = 10_000_000  # every whole-number setting's upper bound (trials, generations, samples, masks)
SEED_MAX = 2**32 - 1  # a ``seed`` setting's


def check_int(name: str, value, *, minimum: int = 1, allow_none: bool = False) -> int | None:
    """An integer in [minimum, INT_MAX] ([0, SEED_MAX] for ``seed``), or None when allowed."""
    if value is None and allow_none:
        return None
    maximum = SEED_MAX if name == "seed" else INT_MAX
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise StrategySettingsError(f"setting {name!r} must be an integer in [{minimum}, {maximum}], got {value!r}")
    return value


def check_fraction(name: str, value, *, upper: float = 1.0, closed: bool = False) -> float:
    """A number in [0, upper), or [0, upper] when ``closed``."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not (0.0 <= value <= upper if closed else 0.0 <= value < upper):
        interval = f"[0, {upper:g}]" if closed else f"[0, {upper:g})"
        raise StrategySettingsError(f"setting {name!r} must be a number in {interval}, got {value!r}")
    return float(value)


def check_positive(name: str, value, *, allow_none: bool = False) -> float | None:
    """A finite number > 0 (or None when allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < math.inf:
        raise StrategySettingsError(f"setting {name!r} must be a positive number, got {value!r}")
    return float(value)


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise StrategySettingsError(f"setting {name!r} must be one of {', '.join(choices)}; got {value!r}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise StrategySettingsError(f"setting {name!r} must be true or false, got {value!r}")
    return value


# budgets -------------------------------------------------------------------------------------------------
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
