"""Cost-aware removal: rank candidates by damage per unit of budget saved, not by damage alone.

Under a size budget an attention and an FFN sublayer differ in cost (3x in parameters on Llama-shaped models,
and differently in KV bytes or latency). The seeds' rankings are cost-blind: greedy FinerCut removes the least
damaging sublayer, which is usually a cheap attention, so it spends many steps (and much damage) per unit of
budget. Here a candidate's score is ``(objective after removal - objective before) / cost removed``:

- ``greedy_per_cost``: FinerCut's loop (every remaining sublayer a candidate, one removal per step) with that
  score. ``stage_sequences`` > 0 scores every candidate on that many calibration sequences first and finishes only
  the ``stage_keep`` best on the full set (EvoPress' staged selection; 0: every candidate on the full set).
- ``oneshot_per_cost``: one evaluation per sublayer (its removal alone), then removal in order of that score
  (Shortened-LLaMA's one-shot ranking, at sublayer granularity and cost-aware).

Both end with a refill: removed sublayers that fit back under the target are re-added, the least damaging
first, so no budget is left unused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from surgery.mask import KeepMask, sublayer_name

from ._common import Count, CountOrZero, Fraction, Results, argmin, first_feasible, next_unmet
from .base import Strategy, register
from .greedy import GreedyRemoval

if TYPE_CHECKING:
    from search.evaluation.context import StrategyRun


def saved_cost(run: StrategyRun, unit: tuple[int, ...]) -> float:
    """Budget-metric cost removed by ``unit`` (flat sublayer indices)."""
    return sum(run.budget.costs.per_sublayer[i] for i in unit) or 1e-12


def per_cost(values: list[float], base: float, saved: list[float]) -> list[float]:
    """Damage per unit of budget saved for each candidate."""
    return [(value - base) / cost for value, cost in zip(values, saved)]


def refill(run: StrategyRun, mask: KeepMask, target: float, stage_sequences: int = 0) -> KeepMask:
    """Re-add removed sublayers that still fit under ``target``, the best (lowest objective) first; with
    ``stage_sequences`` the options are ranked on that many sequences and only the chosen one is fully evaluated."""
    while True:
        options = [mask.with_kept(i) for i in mask.removed]
        options = [m for m in options if run.feasible(m, target)]
        if not options:
            return mask
        if stage_sequences and len(options) > 1:
            mask = options[argmin(run.partial_many(options, stage_sequences))]
            run.evaluate(mask, target)
        else:
            mask = options[argmin(run.evaluate_many(options, target))]


def refill_bound(ctx) -> int:
    """Most evaluations one :func:`refill` can ask for: r + (r - 1) + ... + 1 with r = every sublayer removed."""
    sublayers = 2 * ctx.num_layers
    return sublayers * (sublayers + 1) // 2


def results_with_refill(run: StrategyRun, path: list[KeepMask], why: str, stage_sequences: int = 0) -> Results:
    """For each target, the first path mask meeting it, refilled; recorded under the target."""
    return first_feasible(run, path, why, finish=lambda mask, target: refill(run, mask, target, stage_sequences))


@register("greedy_per_cost")
class GreedyPerCost(GreedyRemoval):
    """FinerCut's greedy loop ranked by damage per unit of the budget metric saved, with staged fidelity."""

    selection_only = False  # ranked by damage per cost saved, not by the objective alone: racing does not apply

    def __init__(self, *, exclude_front: Fraction = 0.0, kinds: Literal["attn", "ffn", "both"] = "both",
                 stage_sequences: CountOrZero = 0, stage_keep: Count = 4):
        super().__init__(exclude_front=exclude_front, kinds=kinds)
        self.stage_sequences, self.stage_keep = stage_sequences, stage_keep

    def expected_evaluations(self, ctx) -> int:
        """Upper bound: the dense mask, every unit removed, then per target its mask and the refill."""
        return 1 + super().expected_evaluations(ctx) + len(ctx.targets) * refill_bound(ctx)

    def search(self, run: StrategyRun) -> Results:
        mask = run.dense()
        value = run.evaluate(mask)
        path, self.order = [mask], []
        while (pending := next_unmet(run, mask)) is not None and (units := self.units(mask)):
            candidates = [KeepMask.from_removed(mask.num_layers, mask.removed + unit) for unit in units]
            saved = [saved_cost(run, unit) for unit in units]
            finalists = self._finalists(run, mask, candidates, saved)
            values = run.evaluate_many([candidates[i] for i in finalists], pending)
            best = finalists[argmin(per_cost(values, value, [saved[i] for i in finalists]))]
            mask, value = candidates[best], values[finalists.index(best)]
            self.order.append(units[best])
            path.append(mask)
        run.note(f"{run.strategy}: removal order "
                 + ", ".join("+".join(sublayer_name(i) for i in unit) for unit in self.order))
        return results_with_refill(run, path, "every allowed unit removed first", self.stage_sequences)

    def _finalists(self, run: StrategyRun, mask: KeepMask, candidates: list[KeepMask], saved: list[float]) -> list[int]:
        """Indices of the candidates to score on the full set: all, or the best on a few sequences."""
        if not self.stage_sequences or len(candidates) <= self.stage_keep:
            return list(range(len(candidates)))
        base, *partial = run.partial_many([mask, *candidates], self.stage_sequences)
        scores = per_cost(partial, base, saved)
        return sorted(range(len(candidates)), key=lambda i: (scores[i], i))[: self.stage_keep]


@register("oneshot_per_cost")
class OneShotPerCost(Strategy):
    """Each sublayer's removal scored alone (2L evaluations), removed in order of damage per cost saved.

    ``stage_sequences`` > 0 scores the single removals on that many calibration sequences only (not recorded);
    the masks of the removal path are evaluated on the full set."""

    def __init__(self, *, stage_sequences: CountOrZero = 0):
        self.stage_sequences = stage_sequences
        self.scores: list[float] = []

    def expected_evaluations(self, ctx) -> int:
        """Upper bound: the dense mask, each sublayer's removal, then per target its mask and the refill."""
        return (0 if self.stage_sequences else 2 * ctx.num_layers + 1) + len(ctx.targets) * (1 + refill_bound(ctx))

    def search(self, run: StrategyRun) -> Results:
        dense = run.dense()
        sublayers = range(len(dense.bits))
        singles = [KeepMask.from_removed(dense.num_layers, (i,)) for i in sublayers]
        if self.stage_sequences:
            base, *values = run.partial_many([dense, *singles], self.stage_sequences)
        else:
            base, values = run.evaluate(dense), run.evaluate_many(singles)
        self.scores = per_cost(values, base, [saved_cost(run, (i,)) for i in sublayers])
        order = sorted(sublayers, key=lambda i: (self.scores[i], i))
        run.note(f"{run.strategy}: sublayers by damage per cost " + ", ".join(sublayer_name(i) for i in order[:20])
                 + (" ..." if len(order) > 20 else ""))
        path = [dense]
        for i in order:
            path.append(KeepMask.from_removed(dense.num_layers, (*path[-1].removed, i)))
        return results_with_refill(run, path, "every sublayer removed", self.stage_sequences)
