"""EvoPress-style evolutionary search, one run per budget target.

A (1 + lambda) elitist loop: each generation draws ``offspring`` distinct, never-seen children of the parent by
swap mutations (re-add a removed sublayer, remove a kept one: the removal count is unchanged), repaired to
meet the budget when sublayer costs differ (remove random kept sublayers until feasible, then re-add removed
ones that still fit, so no budget is wasted). Staged selection scores the children on the first
``stage_sequences`` calibration sequences (``run.partial``, not recorded), the best ``survivors`` on the full
set (``run.evaluate``); the parent is replaced only by a better child. Children are drawn with a bounded
number of attempts, so a small space ends the run early instead of looping.
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING, Literal

from surgery.mask import KeepMask

from ._common import Count, CountOrZero, Results, Seed, argmin, known_feasible, note_warm_start, targets
from .base import Strategy, register

if TYPE_CHECKING:
    from search.evaluation.context import StrategyRun

ATTEMPTS_PER_CHILD = 20


@register("evolutionary")
class Evolutionary(Strategy):
    selection_only = True  # a generation keeps only its best child
    own_objective = "kl"

    def __init__(
        self,
        *,
        generations: CountOrZero = 30,
        offspring: Count = 16,
        survivors: Count = 2,
        stage_sequences: Count = 2,
        max_swaps: Count = 2,
        init: Literal["random", "study"] = "random",
        seed: Seed = None,
    ):
        self.generations, self.offspring, self.survivors = generations, offspring, survivors
        self.stage_sequences, self.max_swaps, self.init, self.seed = stage_sequences, max_swaps, init, seed

    def expected_evaluations(self, ctx) -> int:
        """Upper bound of full evaluations (a small space stops earlier), for progress bars."""
        return len(ctx.targets) * (1 + self.generations * self.survivors)

    def search(self, run: StrategyRun) -> Results:
        seed = run.seed if self.seed is None else self.seed
        return {target: self._evolve(run, target, random.Random(f"{seed}:{target}")) for target in targets(run)}

    # one target ----------------------------------------------------------------------------------------------
    def _evolve(self, run: StrategyRun, target: float, rng: random.Random) -> KeepMask | None:
        parent = self._initial(run, target, rng)
        if parent is None:
            run.note(f"{run.strategy}: no mask meets target {target:g}, even with every sublayer removed")
            return None
        started = time.perf_counter()
        value = start = run.evaluate(parent, target)
        seen = {parent}
        done = 0
        for generation in range(self.generations):
            children = self._children(run, target, parent, rng, seen)
            if not children:
                run.note(f"{run.strategy}: target {target:g}: no unseen child after generation {generation}; stop")
                break
            survivors = self._stage(run, children)
            values = run.evaluate_many(survivors, target)
            best = argmin(values)
            if values[best] < value:
                parent, value = survivors[best], values[best]
            done += 1
        run.note(f"{run.strategy} target {target:g}: objective {start:.4g} -> {value:.4g} in {done} generation(s), "
                 f"{time.perf_counter() - started:.1f} s")
        return parent

    def _stage(self, run: StrategyRun, children: list[KeepMask]) -> list[KeepMask]:
        """The ``survivors`` children with the best objective on the first ``stage_sequences`` sequences."""
        if len(children) <= self.survivors:
            return children
        scores = [run.partial(child, self.stage_sequences) for child in children]
        order = sorted(range(len(children)), key=lambda i: (scores[i], i))
        return [children[i] for i in order[: self.survivors]]

    def _initial(self, run: StrategyRun, target: float, rng: random.Random) -> KeepMask | None:
        if self.init == "study":
            known = known_feasible(run, target, 1)
            if known:
                note_warm_start(run, target, known[0])
                return known[0]
        candidates = [m for m in (self._random_mask(run, target, rng) for _ in range(self.offspring)) if m]
        if not candidates:
            return None
        return self._stage(run, list(dict.fromkeys(candidates)))[0]

    # variation -----------------------------------------------------------------------------------------------
    def _children(self, run: StrategyRun, target, parent: KeepMask, rng: random.Random, seen: set) -> list[KeepMask]:
        children: list[KeepMask] = []
        for _ in range(self.offspring * ATTEMPTS_PER_CHILD):
            child = self._mutate(run, target, parent, rng)
            if child is not None and child not in seen:
                seen.add(child)
                children.append(child)
                if len(children) == self.offspring:
                    break
        return children

    def _mutate(self, run: StrategyRun, target, parent: KeepMask, rng: random.Random) -> KeepMask | None:
        bits = list(parent.bits)
        for _ in range(rng.randint(1, self.max_swaps)):
            removed = [i for i, keep in enumerate(bits) if not keep]
            kept = [i for i, keep in enumerate(bits) if keep]
            if not removed or not kept:
                break
            bits[rng.choice(removed)], bits[rng.choice(kept)] = True, False
        return self._repair(run, target, bits, rng)

    def _random_mask(self, run: StrategyRun, target, rng: random.Random) -> KeepMask | None:
        return self._repair(run, target, [True] * (2 * run.num_layers), rng)

    @staticmethod
    def _repair(run: StrategyRun, target, bits: list[bool], rng: random.Random) -> KeepMask | None:
        """Remove random kept sublayers until feasible, then re-add removed ones (random order) that still fit."""
        kept = [i for i, keep in enumerate(bits) if keep]
        rng.shuffle(kept)
        while not run.feasible(KeepMask(tuple(bits)), target):
            if not kept:
                return None
            bits[kept.pop()] = False
        removed = [i for i, keep in enumerate(bits) if not keep]
        rng.shuffle(removed)
        for index in removed:
            bits[index] = True
            if not run.feasible(KeepMask(tuple(bits)), target):
                bits[index] = False
        return KeepMask(tuple(bits))
