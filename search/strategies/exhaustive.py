"""Exhaustive enumeration of all 2^(2L) keep-masks: the true optimum per target, the yardstick for the others.

Masks that meet no target are skipped (never evaluated); each evaluated mask is tagged with the tightest
target it meets. Refused when the space exceeds ``max_masks``.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from surgery.mask import KeepMask

from ._common import Count, Results, argmin, targets, tightest_met
from .base import Strategy, StrategySettingsError, register

if TYPE_CHECKING:
    from search.evaluation.context import StrategyRun


@register("exhaustive")
class Exhaustive(Strategy):
    def __init__(self, *, max_masks: Count = 4096):
        self.max_masks = max_masks

    def expected_evaluations(self, ctx) -> int:
        return 2 ** (2 * ctx.num_layers)  # upper bound: masks meeting no target are skipped

    def search(self, run: StrategyRun) -> Results:
        sublayers = 2 * run.num_layers
        size = 2**sublayers
        if size > self.max_masks:
            raise StrategySettingsError(
                f"strategy {run.strategy!r}: {run.num_layers} layers give 2^{sublayers} = {size} masks, more than "
                f"setting 'max_masks' = {self.max_masks}; raise max_masks or choose another strategy"
            )
        masks: dict[float | None, list[KeepMask]] = {}
        for bits in itertools.product((True, False), repeat=sublayers):
            mask = KeepMask(bits)
            masks.setdefault(tightest_met(run, mask), []).append(mask)
        values = {
            mask: value
            for tag, group in masks.items()
            if tag is not None
            for mask, value in zip(group, run.evaluate_many(group, tag))
        }
        run.note(f"{run.strategy}: {len(values)} of {size} masks meet a target and were evaluated")
        results: Results = {}
        for target in targets(run):
            feasible = [m for m in values if run.feasible(m, target)]
            results[target] = feasible[argmin([values[m] for m in feasible])] if feasible else None
            if not feasible:
                run.note(f"{run.strategy}: no mask meets target {target:g}")
        return results
