"""Greedy removal, one unit per step: FinerCut and BlockPruner (sublayers), SLEB (whole layers).

Each step evaluates every remaining candidate's removal on the full calibration set and removes the one with
the lowest objective, until the tightest budget target is met (O(L^2) evaluations). The answer for a target is
the first mask of the removal path that meets it. The objective is the study's (FinerCut's paper uses JS,
BlockPruner and SLEB perplexity / calibration loss); the removal order is kept in ``self.order``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from surgery.mask import ATTN, FFN, KeepMask, sublayer_name

from ._common import Fraction, Results, argmin, first_feasible, next_unmet
from .base import Strategy, register

if TYPE_CHECKING:
    from search.evaluation.context import StrategyRun

KINDS = {"attn": (ATTN,), "ffn": (FFN,), "both": (ATTN, FFN)}


class GreedyRemoval(Strategy):
    """Greedy loop over removal units; subclasses say what a unit is."""

    selection_only = True  # each step keeps only the best removal

    def __init__(self, *, exclude_front: Fraction = 0.0, kinds: Literal["attn", "ffn", "both"] = "both"):
        self.exclude_front = exclude_front
        self.kinds = kinds
        self.order: list[tuple[int, ...]] = []  # flat sublayer indices removed at each step

    def units(self, mask: KeepMask) -> list[tuple[int, ...]]:
        """Flat sublayer indices removed together, for every unit still removable from ``mask``."""
        first = int(self.exclude_front * mask.num_layers)
        return [
            (2 * layer + kind,)
            for layer in range(first, mask.num_layers)
            for kind in KINDS[self.kinds]
            if mask.keeps(layer, kind)
        ]

    def expected_evaluations(self, ctx) -> int:
        """Upper bound (every unit removed), for progress bars."""
        units = len(self.units(ctx.dense()))
        return units * (units + 1) // 2 + len(ctx.targets)

    def search(self, run: StrategyRun) -> Results:
        mask = run.dense()
        path, self.order = [mask], []
        while (pending := next_unmet(run, mask)) is not None:
            units = self.units(mask)
            if not units:
                break
            candidates = [KeepMask.from_removed(mask.num_layers, mask.removed + unit) for unit in units]
            best = argmin(run.evaluate_many(candidates, pending))
            mask = candidates[best]
            self.order.append(units[best])
            path.append(mask)
        run.note(f"{run.strategy}: removal order "
                 + ", ".join("+".join(sublayer_name(i) for i in unit) for unit in self.order))
        return first_feasible(run, path, "every allowed unit removed first")


@register("greedy_finercut")
class GreedyFinerCut(GreedyRemoval):
    """FinerCut: attention and FFN sublayers as candidates; ``exclude_front`` keeps the first layers
    (FinerCut's -x), ``kinds`` restricts candidates to attention or FFN sublayers."""

    own_objective = "js"
    seed_method = True


@register("blockpruner")
class BlockPruner(GreedyRemoval):
    """BlockPruner: greedy over sublayers, by perplexity in the paper."""

    own_objective = "ppl"
    seed_method = True

    def __init__(self, *, exclude_front: Fraction = 0.0):
        super().__init__(exclude_front=exclude_front, kinds="both")


@register("sleb")
class SLEB(GreedyRemoval):
    """SLEB: greedy over whole layers (both sublayers removed together), by calibration loss in the paper."""

    own_objective = "ppl"
    seed_method = True

    def __init__(self, *, exclude_front: Fraction = 0.0):
        super().__init__(exclude_front=exclude_front, kinds="both")

    def units(self, mask: KeepMask) -> list[tuple[int, ...]]:
        first = int(self.exclude_front * mask.num_layers)
        return [
            (2 * layer + ATTN, 2 * layer + FFN)
            for layer in range(first, mask.num_layers)
            if mask.keeps(layer, ATTN) and mask.keeps(layer, FFN)
        ]
