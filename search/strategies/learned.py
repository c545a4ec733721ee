"""Learned masks: hard-concrete sublayer gates trained against the dense model under a budget (Sheared-LLaMA).

Each sublayer i gets a gate ``z_i`` on its residual contribution (:mod:`surgery.gates`):
``h = h + z_A * attn(norm(h)); h = h + z_M * ffn(norm(h))``. The model's weights are frozen; only the gates'
``log_alpha`` train.

Why hard-concrete (Louizos et al. 2018, as in Sheared-LLaMA) rather than a straight-through estimator: a
stretched, clamped concrete sample ``z = clamp(sigmoid((log u - log(1-u) + log_alpha) / beta) * (r - l) + l,
0, 1)`` with ``(l, r) = (-0.1, 1.1)`` is exactly 0 or 1 with positive probability, so the model is trained
on (and the KL sees) genuinely removed sublayers, while ``P(z_i != 0) = sigmoid(log_alpha - beta log(-l/r))``
is a smooth function of ``log_alpha``: the expected cost ``fixed + sum_i P(z_i != 0) cost_i`` has an exact
gradient. That works for any additive budget (parameters, KV bytes, latency tables). A straight-through
estimator would need a biased gradient for the gate and a separate relaxation for the cost.

Budget: a hard constraint, not a penalty. Every step adds one shift ``b`` to all ``log_alpha``, found by bisection
so that the expected cost ``fixed + sum_i P(z_i != 0 | log_alpha_i + b) cost_i`` equals the step's limit exactly
(:func:`budget_shift`); the limit ramps from the dense cost down to the target over the first ``warmup`` fraction
of the steps, then stays there. One Newton step on the live gates gives ``b`` its implicit gradient, so the
objective's gradient moves gates only along the budget surface: the gates compete for the budget, and the expected
cost is on the target for the whole second part of training. (A Lagrangian ``lambda_1 d + lambda_2 d^2`` as in
Sheared-LLaMA only approaches the target as the multipliers grow: with the gates' sigmoid near saturation its
pull is weak, and within 100 steps the expected cost on stories260k stayed far above the target.)

Loss per step: the study's objective (KL(dense || gated) by default, from the cached dense reference of the
scorer) on ``batch`` calibration sequences, each with its own gate sample (one removal pattern per sequence, a
``batch`` patterns per step at no extra cost). Gates descend with Adam (``lr``); the temperature moves
geometrically from ``temperature`` to ``final_temperature``.

Rounding: sublayers are kept in order of a score (the trained ``log_alpha``, or one gate draw) while the mask stays
feasible (budget target and every extra constraint of the study); a sublayer that no longer fits is skipped, so a
large sublayer can make room for smaller ones below it. The candidates are the rounding of ``log_alpha`` and the
most frequent roundings of ``samples`` draws from the trained gates, ``candidates`` in all; they are evaluated with
``run.evaluate`` (recorded as trials of this strategy in the main study, from which the Optuna sampler strategies
warm-start) and the best is returned.

Cost: one step is ``batch`` sequences forward and backward, about 3 forwards each. The training cost is added to
``run.forwards`` in sequence-forwards and noted in evaluations-equivalent (one evaluation = one forward of every
calibration sequence), comparable with greedy FinerCut's evaluation count; the candidates add one evaluation each.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from objectives.budgets import BudgetError
from objectives.proxy import Reference
from search.evaluation.context import Budget, StrategyRun
from surgery.gates import SublayerGates, frozen
from surgery.mask import KeepMask

from ._common import ClosedFraction, Count, Flag, Positive, Seed, known_feasible, note_warm_start
from .base import Strategy, register

STRETCH = (-0.1, 1.1)
BACKWARD_FACTOR = 3  # forward + backward ~ 3 forwards
SHIFT_RANGE = 30.0  # bound of the budget shift added to every log_alpha


class HardConcrete(nn.Module):
    """One hard-concrete gate per sublayer: ``log_alpha`` parameters, temperature ``beta``, stretch (l, r).

    Every method takes a ``shift`` added to all ``log_alpha`` (the budget shift of :func:`budget_shift`).
    """

    def __init__(self, n: int, *, beta: float):
        super().__init__()
        self.beta = beta
        self.log_alpha = nn.Parameter(torch.zeros(n))

    def sample(self, generator: torch.Generator, shift=0.0, count: int | None = None) -> torch.Tensor:
        """Gate values, shape ``(n,)`` or ``(count, n)`` (independent samples)."""
        low, high = STRETCH
        shape = self.log_alpha.shape if count is None else (count, *self.log_alpha.shape)
        u = torch.rand(shape, generator=generator).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((u.log() - (-u).log1p() + self.log_alpha + shift) / self.beta)
        return (s * (high - low) + low).clamp(0.0, 1.0)

    def deterministic(self, shift=0.0) -> torch.Tensor:
        low, high = STRETCH
        return (torch.sigmoid(self.log_alpha + shift) * (high - low) + low).clamp(0.0, 1.0)

    def keep_prob(self, shift=0.0, log_alpha: torch.Tensor | None = None) -> torch.Tensor:
        """P(z != 0) per gate."""
        low, high = STRETCH
        log_alpha = self.log_alpha if log_alpha is None else log_alpha
        return torch.sigmoid(log_alpha + shift - self.beta * math.log(-low / high))


def budget_shift(gates: HardConcrete, costs: torch.Tensor, fixed: float, limit: float) -> torch.Tensor:
    """The shift b with expected cost ``fixed + sum_i P_i(b) costs_i == limit``, differentiable in log_alpha.

    b is found by bisection on the detached gates, then one Newton step on the live gates: its value is b and
    its gradient the implicit one, ``db/dlog_alpha_i = -(dE/dlog_alpha_i) / (dE/db)``. When even b = +30 keeps
    the cost under the limit (no pressure), or b = -30 cannot reach it, the bound is returned as a constant.
    """
    log_alpha = gates.log_alpha.detach()

    def expected(shift: float) -> float:
        return fixed + float((gates.keep_prob(shift, log_alpha) * costs).sum())

    low, high = -SHIFT_RANGE, SHIFT_RANGE
    if expected(high) <= limit:
        return torch.tensor(high)
    if expected(low) >= limit:
        return torch.tensor(low)
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (low, middle) if expected(middle) > limit else (middle, high)
    shift = (low + high) / 2
    prob = gates.keep_prob(shift)
    slope = float((prob * (1 - prob) * costs).sum().detach())
    if slope <= 1e-12:
        return torch.tensor(shift)
    return shift + (limit - fixed - (prob * costs).sum()) / slope


@dataclass
class Trained:
    """Result of one training run: final gate scores, candidate masks, last-step statistics."""

    scores: tuple[float, ...]
    candidates: tuple[KeepMask, ...]  # rounding of log_alpha, then the most frequent roundings of gate draws
    objective: float
    expected_removed: float
    steps: int
    sequences: int


def round_to_budget(scores, budget: Budget, target: float) -> KeepMask | None:
    """Keep sublayers in descending score order while the mask stays feasible (None if nothing is)."""
    n = len(scores)
    mask = KeepMask((False,) * n)
    if not budget.feasible(mask, target):
        return None
    for index in sorted(range(n), key=lambda i: (-scores[i], i)):
        candidate = mask.with_kept(index)
        if budget.feasible(candidate, target):
            mask = candidate
    return mask


def reference_for(reference: Reference | None, sequences: torch.Tensor, width: int) -> Reference | None:
    """The dense reference rows of the given calibration sequences (``width`` positions each)."""
    if reference is None:
        return None
    rows = (sequences[:, None] * width + torch.arange(width)).reshape(-1)
    pick = lambda t: None if t is None else t[rows]  # noqa: E731
    return Reference(reference.logp[rows], pick(reference.index), pick(reference.log_tail))


@register("learned")
class LearnedMasks(Strategy):
    """Hard-concrete gates held on the budget by a shift, one training run per target, rounded to the budget."""

    def __init__(
        self,
        *,
        steps: Count = 60,
        lr: Positive = 0.05,
        temperature: Positive = 2 / 3,
        final_temperature: Positive | None = None,  # None: no annealing
        batch: Count = 8,  # calibration sequences per step
        warmup: ClosedFraction = 0.5,  # fraction of the steps
        candidates: Count = 8,
        samples: Count = 256,
        seed: Seed = None,
        init: Literal["uniform", "study"] = "uniform",  # study: start from the best known mask
        init_scale: Positive = 2.0,
        progress: Flag = True,
    ):
        self.steps, self.lr, self.temperature, self.batch = steps, float(lr), float(temperature), batch
        self.final_temperature = self.temperature if final_temperature is None else float(final_temperature)
        self.warmup, self.candidates, self.samples, self.seed = float(warmup), candidates, samples, seed
        self.progress, self.init, self.init_scale = progress, init, float(init_scale)

    def expected_evaluations(self, ctx) -> int:
        return self.candidates * len(ctx.targets)

    def search(self, run: StrategyRun) -> dict[float, KeepMask | None]:
        results: dict[float, KeepMask | None] = {}
        for number, target in enumerate(run.targets):
            try:
                run.budget.costs.limit(target)
            except BudgetError as error:
                run.note(f"learned: target {target:g} skipped: {error}")
                results[target] = None
                continue
            start = self._start_mask(run, target)
            trained = self.train(run, target, seed=(run.seed if self.seed is None else self.seed) + number,
                                 start=start)
            results[target] = self._finish(run, target, trained)
        return results

    def _finish(self, run: StrategyRun, target: float, trained: Trained) -> KeepMask | None:
        """Account the training cost, evaluate the candidate roundings, return the best."""
        sequence_forwards = BACKWARD_FACTOR * trained.steps * trained.sequences
        run.forwards += sequence_forwards
        equivalent = sequence_forwards / len(run.scorer.input_ids)
        summary = (
            f"learned target {target:g}: training {trained.steps} steps x {trained.sequences} sequences "
            f"forward+backward (~{BACKWARD_FACTOR} forwards each) = {equivalent:.0f} evaluations-equivalent; last "
            f"step's sampled-gate objective {trained.objective:.4g}, expected {trained.expected_removed:.1%} removed"
        )
        if not trained.candidates:
            run.note(f"{summary}; no mask meets the budget and constraints")
            return None
        values = run.evaluate_many(trained.candidates, target)
        value, best = min(zip(values, trained.candidates), key=lambda pair: pair[0])
        run.note(
            f"{summary}; best of {len(values)} rounding(s): {best} ({run.budget.costs.removed_fraction(best):.1%} removed), "
            f"objective {value:.4g}; {equivalent + len(values):.0f} evaluations-equivalent in all"
        )
        return best

    def _start_mask(self, run: StrategyRun, target: float) -> KeepMask | None:
        """``init: study``: the best mask of the study that meets the target (None: start from uniform gates)."""
        if self.init != "study":
            return None
        known = known_feasible(run, target, 1)
        if known:
            note_warm_start(run, target, known[0])
        return known[0] if known else None

    def train(self, run: StrategyRun, target: float, *, seed: int, start: KeepMask | None = None) -> Trained:
        """Train gates for one budget target; deterministic given ``seed``. ``start``: initial gate signs."""
        scorer, costs, limit = run.scorer, run.budget.costs, run.budget.costs.limit(target)
        generator = torch.Generator().manual_seed(seed)
        gates = HardConcrete(len(costs.per_sublayer), beta=self.temperature)
        if start is not None:
            with torch.no_grad():
                gates.log_alpha.copy_(torch.tensor([self.init_scale if keep else -self.init_scale for keep in start.bits]))
        optimizer = torch.optim.Adam(gates.parameters(), lr=self.lr)
        sublayer_cost = torch.tensor(costs.per_sublayer, dtype=torch.float32)
        batches = _batches(len(scorer.input_ids), min(self.batch, len(scorer.input_ids)), generator)
        bar = tqdm(range(self.steps), desc=f"learned {target:.0%}", disable=not self.progress, leave=False)
        with SublayerGates(scorer.model) as hooks, frozen(scorer.model), torch.enable_grad():
            for step in bar:
                sequences = next(batches)
                gates.beta = self._temperature_at(step)
                shift = budget_shift(gates, sublayer_cost, costs.fixed, self._limit_at(step, limit, costs.dense))
                hooks.values = gates.sample(generator, shift, len(sequences))  # one gate pattern per sequence
                loss = self._objective(scorer, sequences)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    cost = costs.fixed + float((gates.keep_prob(shift) * sublayer_cost).sum())
                objective, removed = float(loss.detach()), 1 - cost / costs.dense
                if step % 10 == 0 or step == self.steps - 1:
                    bar.set_postfix(objective=f"{objective:.4f}", removed=f"{removed:.1%}")
        bar.close()
        with torch.no_grad():
            shift = budget_shift(gates, sublayer_cost, costs.fixed, limit)
            candidates = self._candidates(gates, run.budget, target, shift, generator)
        return Trained(tuple(gates.log_alpha.tolist()), candidates, objective, removed, self.steps, len(sequences))

    def _candidates(self, gates, budget: Budget, target, shift, generator) -> tuple[KeepMask, ...]:
        """The rounding of ``log_alpha``, then the most frequent roundings of ``samples`` gate draws."""
        tie = 1e-3 * torch.sigmoid(gates.log_alpha)  # order gates drawn at the same value by log_alpha
        draws = gates.sample(generator, shift, self.samples)
        counts = Counter(round_to_budget((row + tie).tolist(), budget, target) for row in draws)
        final = round_to_budget(gates.log_alpha.tolist(), budget, target)
        ranked = dict.fromkeys([final] + [m for m, _ in counts.most_common()])
        return tuple(m for m in ranked if m is not None)[: self.candidates]

    def _limit_at(self, step: int, limit: float, dense: float) -> float:
        """The cost target of a step: from dense down to ``limit`` over the warm-up, then ``limit``."""
        ramp = self.warmup * self.steps
        return limit if step >= ramp else dense - (dense - limit) * (step + 1) / (ramp + 1)

    def _temperature_at(self, step: int) -> float:
        """Geometric from ``temperature`` at the first step to ``final_temperature`` at the last."""
        fraction = step / max(self.steps - 1, 1)
        return self.temperature * (self.final_temperature / self.temperature) ** fraction

    @staticmethod
    def _objective(scorer, sequences: torch.Tensor) -> torch.Tensor:
        """Mean per-position objective of the gated model on the given calibration sequences."""
        ids = scorer.input_ids[sequences].to(scorer.device)
        logits = scorer.model(input_ids=ids, use_cache=False).logits
        reference = reference_for(scorer.reference, sequences, scorer.positions_per_sequence)
        summed = scorer.objective.summed(logits, reference, ids)
        return summed / (len(ids) * scorer.positions_per_sequence)


def _batches(count: int, size: int, generator: torch.Generator):
    """Endless seeded batches of sequence indices: a fresh permutation each epoch."""
    while True:
        order = torch.randperm(count, generator=generator)
        for start in range(0, count - size + 1, size):
            yield order[start : start + size]
