"""One-shot layer rankings: Gromov et al. (best contiguous window), ShortGPT (block influence) and
Shortened LLaMA (objective with each layer removed). They remove whole layers only, so a target that whole
layers cannot meet exactly is met by removing more."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from objectives.proxy import angular_distances, block_influence
from surgery.mask import KeepMask

from ._common import Flag, Results, first_feasible, prefix_path, targets
from .base import Strategy, register

if TYPE_CHECKING:
    from search.evaluation.context import StrategyRun


def ranked_layers(scores: torch.Tensor | list[float]) -> list[int]:
    """Layer indices by ascending score (ties: lower index first)."""
    values = [float(s) for s in scores]
    return sorted(range(len(values)), key=lambda layer: (values[layer], layer))


@register("gromov")
class Gromov(Strategy):
    """Remove the block of n consecutive layers whose input and output hidden states are closest in angle,
    for the smallest n that meets each target (one forward pass of the dense model)."""

    seed_method = True

    def __init__(self, *, last_token_only: Flag = True):
        self.last_token_only = last_token_only
        self.distances: dict[int, list[float]] = {}  # n -> distance of the window starting at each layer

    def expected_evaluations(self, ctx) -> int:
        return len(ctx.targets)

    def search(self, run: StrategyRun) -> Results:
        hidden = run.scorer.hidden_states()
        layers = run.num_layers
        self.distances = {
            n: angular_distances(hidden, n, self.last_token_only).tolist() for n in range(1, layers + 1)
        }
        return {target: self._best_window(run, target) for target in targets(run)}

    def _best_window(self, run: StrategyRun, target: float) -> KeepMask | None:
        layers = run.num_layers
        for n, distances in self.distances.items():
            windows = [
                (d, start, KeepMask.from_layers(layers, range(start, start + n)))
                for start, d in enumerate(distances)
            ]
            feasible = [w for w in windows if run.feasible(w[2], target)]
            if feasible:
                distance, start, mask = min(feasible, key=lambda w: (w[0], w[1]))
                run.note(f"{run.strategy}: target {target:g}: layers {start}..{start + n - 1} "
                         f"(angular distance {distance:.4f})")
                run.evaluate(mask, target)
                return mask
        run.note(f"{run.strategy}: no window of layers meets target {target:g}")
        return None


@register("shortgpt")
class ShortGPT(Strategy):
    """Remove the layers of lowest Block Influence (1 - cos(input, output)) until each target is met."""

    seed_method = True

    def __init__(self):
        self.influence: list[float] = []

    def expected_evaluations(self, ctx) -> int:
        return len(ctx.targets)

    def search(self, run: StrategyRun) -> Results:
        self.influence = block_influence(run.scorer.hidden_states()).tolist()
        order = ranked_layers(self.influence)
        run.note(f"{run.strategy}: layers by block influence {order}")
        return first_feasible(run, prefix_path(run.num_layers, order), "every layer removed")


@register("shortened_llama")
class ShortenedLlama(Strategy):
    """Score each single-layer removal (L evaluations), then remove layers in order of least damage."""

    seed_method = True

    own_objective = "ppl"

    def __init__(self):
        self.scores: list[float] = []

    def expected_evaluations(self, ctx) -> int:
        return ctx.num_layers + len(ctx.targets)

    def search(self, run: StrategyRun) -> Results:
        layers = run.num_layers
        singles = [KeepMask.from_layers(layers, [layer]) for layer in range(layers)]
        self.scores = run.evaluate_many(singles)  # serve every target: no target tag
        order = ranked_layers(self.scores)
        run.note(f"{run.strategy}: layers by damage {order}")
        return first_feasible(run, prefix_path(layers, order), "every layer removed")
