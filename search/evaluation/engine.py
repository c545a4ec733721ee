"""Fast mask evaluation: prefix reuse of residual-stream states and staged selection (racing).

:class:`PrefixEngine` scores a batch of keep-masks with the same model, calibration batch, reference and
objective as :class:`~objectives.scorer.MaskScorer`, but runs the decoder layer by layer itself. The masks of a
batch are visited in lexicographic order of their keep bits; two consecutive masks share every state up to
their first differing sublayer (``KeepMask.first_difference``), so each mask is computed only from there on.
States are kept at the boundaries where a later mask of the batch branches off, and a layer is split at its
attention/FFN boundary only where a branch starts there (sequential-residual families).

Across batches, a :class:`StateCache` (bounded in bytes, least recently used first out) keeps every mask's
layer-boundary states keyed by the mask bits before the boundary: the state there depends on nothing else. A
mask starts from the deepest cached state of its prefix. In a greedy step, removing sublayer ``a`` from the
previous step's candidates ``m - i`` (``i < a``) gives this step's ``m - a - i``, which only has to be
computed from ``a`` on; over a greedy run this cuts sublayer work from about half the plain loop's to a third.

With repair-aware scoring (``MaskScorer(repair="linear")``), each mask runs with its fitted linear repair folded
into its anchors (``MaskScorer.repaired``; fits are kept per mask by the scorer). The stream entering a sublayer
up to the mask's first anchor (``MaskScorer.first_repaired``) is the unrepaired masked model's and depends on the
prefix bits only, so states are reused and stored there only; past it a state depends on the mask's fitted maps
(which depend on the whole run after the anchor) and is recomputed for every mask. Values equal
``fit_linear_repair`` on the scorer's fit sequences (``repair_ids``) + ``folded`` + the plain loop's on its scored
ones.

The layers are called exactly as the model calls them: each layer's arguments (attention mask, position
embeddings, ...) are captured once from a real dense forward per micro-batch, removed sublayers are the
masker's stand-ins, and the same micro-batches, reference rows and summation order are used, so results equal
the plain loop's (bit for bit on a deterministic device). The final norm and output head are checked against
the model's own logits at capture time; a family whose head is not reproduced raises :class:`EngineError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from objectives.lru import BytesLRU, tensor_bytes
from objectives.scorer import MaskScorer
from search.evaluation.evaluator import EngineCounters, Evaluator  # noqa: F401 - EngineCounters: read from here too
from surgery.errors import UserError
from surgery.families import get_path
from surgery.mask import ATTN, FFN, KeepMask

_MEMO_LIMIT = 200_000  # (mask, micro-batch) partial sums kept for staged selection
DEFAULT_STATE_CACHE_MB = 1024
REPAIR_GROUP = 16  # repair-aware scoring: masks scored through all micro-batches together (their fits stay cached)


class EngineError(UserError):
    """The fast engine cannot reproduce this model's forward (use ``engine.prefix_reuse: false``)."""


@dataclass(frozen=True)
class Staging:
    """Staged selection: score every candidate on ``sequences`` sequences, confirm the best ``keep`` on all."""

    sequences: int = 2
    keep: int = 4

    def __post_init__(self) -> None:
        if self.sequences < 1 or self.keep < 1:
            raise ValueError(f"staging needs sequences >= 1 and keep >= 1, got {self.sequences}, {self.keep}")


@dataclass
class _Chunk:
    """One captured micro-batch: layer-0 input and each layer's call arguments from a dense forward."""

    start: int
    ids: torch.Tensor
    h0: torch.Tensor
    calls: list[tuple[tuple, dict]]

    @property
    def key(self) -> tuple[int, int]:
        """(first sequence, sequences): what the state cache files this micro-batch's states under."""
        return self.start, len(self.ids)


class StateCache(BytesLRU):
    """Residual-stream states keyed by (micro-batch, mask bits before the boundary); LRU within ``limit_bytes``."""

    def __init__(self, limit_bytes: int):
        super().__init__(limit_bytes, tensor_bytes)


class PlainBackend(Evaluator):
    """The plain loop: one full forward of the masked model per mask (``MaskScorer.score``)."""

    def __init__(self, scorer: MaskScorer):
        super().__init__()
        self.scorer = scorer

    def score_many(self, masks: Sequence[KeepMask], sequences: int | None = None) -> list[float]:
        count = _count(self.scorer, sequences)
        values = []
        for mask in masks:
            values.append(self.scorer.score(mask, sequences=count))
            self.counters.sublayer_forwards += len(mask.kept) * count
            self.counters.head_forwards += count
        return values


class PrefixEngine(Evaluator):
    """Scores batches of masks with prefix reuse; same numbers as :class:`MaskScorer` (see module doc)."""

    races = True

    def __init__(self, scorer: MaskScorer, *, state_cache_mb: float = DEFAULT_STATE_CACHE_MB):
        super().__init__()
        self.scorer = scorer
        self.cache = StateCache(int(state_cache_mb * 2**20))
        self.model = scorer.model
        self.masker = scorer.masker
        self.layers = self.masker.layers
        self.splittable = self.masker.family.residual == "sequential"
        self.norm = get_path(self.model, self.masker.family.final_norm)
        self.head = self.model.get_output_embeddings()
        self.softcap = getattr(self.model.config, "final_logit_softcapping", None)
        self._chunks: dict[tuple[int, int], _Chunk] = {}
        self._memo: dict[tuple[tuple[bool, ...], int, int], float] = {}

    # capture -----------------------------------------------------------------------------------------------
    def _chunk(self, start: int, count: int) -> _Chunk:
        key = (start, count)
        if key not in self._chunks:
            self._chunks[key] = self._capture(start, self.scorer.input_ids[start : start + count])
        return self._chunks[key]

    @torch.no_grad()
    def _capture(self, start: int, ids: torch.Tensor) -> _Chunk:
        ids = ids.to(self.scorer.device)
        calls: list[Any] = [None] * len(self.layers)
        last: list[torch.Tensor] = []
        hooks = [layer.register_forward_pre_hook(_recorder(calls, i), with_kwargs=True)
                 for i, layer in enumerate(self.layers)]
        hooks.append(self.layers[-1].register_forward_hook(lambda m, a, out: last.append(_first(out))))
        previous = self.masker.current
        self.masker.restore()
        try:
            logits = self.model(input_ids=ids, use_cache=False).logits
        finally:
            for hook in hooks:
                hook.remove()
            self.masker.apply(previous)
        self.counters.captures += 1
        self._check_head(last[0], logits)
        return _Chunk(start, ids, calls[0][0][0], [(args[1:], kwargs) for args, kwargs in calls])

    def _check_head(self, hidden: torch.Tensor, logits: torch.Tensor) -> None:
        mine = self._logits(hidden)
        scale = max(1.0, float(logits.abs().max()))
        if mine.shape != logits.shape or float((mine - logits).abs().max()) > 1e-4 * scale:
            raise EngineError(
                f"the engine's final norm + head do not reproduce {self.masker.family.name!r} logits; "
                "set engine.prefix_reuse: false"
            )

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.norm(hidden))
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    # scoring -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def score_many(self, masks: Sequence[KeepMask], sequences: int | None = None) -> list[float]:
        """Objective of each mask on the first ``sequences`` calibration sequences (all by default)."""
        count = _count(self.scorer, sequences)
        unique = sorted({m.bits for m in masks})
        for mask in unique:
            KeepMask(mask).check_layers(len(self.layers))
        totals = dict.fromkeys(unique, 0.0)
        # repair-aware: a few masks at a time through every micro-batch, so each fit is reused from the scorer's
        # cache rather than evicted by the rest of the batch (the same sums, in the same order, per mask)
        step = len(unique) if self.scorer.repair == "none" else REPAIR_GROUP
        previous = self.masker.current
        try:
            for group in (unique[i : i + step] for i in range(0, len(unique), max(1, step))):
                for start in range(0, count, self.scorer.batch_size):
                    size = min(self.scorer.batch_size, count - start)
                    for bits, value in self._score_chunk(group, start, size).items():
                        totals[bits] += value
        finally:
            self.masker.apply(previous)
        positions = count * self.scorer.positions_per_sequence
        return [self.scorer.objective.finish(totals[m.bits] / positions) for m in masks]

    @torch.no_grad()
    def race(self, masks: Sequence[KeepMask], best_known: float = math.inf) -> list[float]:
        """Exact racing for an argmin: full objective of every mask that can still be the best, ``inf`` for the rest.

        Per-position objective values are non-negative, so a partial sum over the first micro-batches bounds the
        full value from below. After the first micro-batch the leader is finished; then micro-batch by
        micro-batch every mask whose bound exceeds the best full value (or ``best_known``) is dropped. The best
        mask and its value are the plain loop's; dropped masks are never finished.
        """
        total, size = len(self.scorer.input_ids), self.scorer.batch_size
        spans = [(start, min(size, total - start)) for start in range(0, total, size)]
        alive = sorted({m.bits for m in masks})
        sums = dict.fromkeys(alive, 0.0)
        value = lambda s, n: self.scorer.objective.finish(s / (n * self.scorer.positions_per_sequence))  # noqa: E731
        bound = best_known
        previous = self.masker.current
        try:
            for index, (start, count) in enumerate(spans):
                for bits, part in self._score_chunk(alive, start, count).items():
                    sums[bits] += part
                if index == 0:
                    leader = min(alive, key=lambda b: sums[b])
                    bound = min(bound, self._finish(leader, spans, sums[leader], value))
                margin = 1e-6 * abs(bound) + 1e-12
                alive = [b for b in alive if value(sums[b], total) <= bound + margin]  # a lower bound
        finally:
            self.masker.apply(previous)
        finished = {bits: value(sums[bits], total) for bits in alive}
        return [finished.get(m.bits, math.inf) for m in masks]

    def _finish(self, bits: tuple[bool, ...], spans, first: float, value) -> float:
        """Full value of one mask whose first micro-batch sum is ``first``."""
        summed = first
        for start, count in spans[1:]:  # the plain loop's summation order
            summed += self._score_chunk([bits], start, count)[bits]
        return value(summed, len(self.scorer.input_ids))

    def _score_chunk(self, masks: list[tuple[bool, ...]], start: int, size: int) -> dict:
        """Summed objective of each (sorted, distinct) mask on one micro-batch."""
        todo = [bits for bits in masks if (bits, start, size) not in self._memo]
        branches = [_branch(a, b) for a, b in zip(todo, todo[1:])]
        if not self.splittable:
            branches = [b - b % 2 for b in branches]
        if todo:
            chunk = self._chunk(start, size)
            reference = self.scorer.reference_rows(start, size)
            states: dict[tuple[bool, ...], torch.Tensor] = {}  # this batch's branch points, by prefix
            for k, bits in enumerate(todo):
                mask = KeepMask(bits)
                limit = self.scorer.first_repaired(mask)  # no state past it is shared with another mask
                with self.scorer.repaired(mask):
                    begin, hidden = self._start(bits, chunk, states, limit)
                    hidden = self._run(mask, chunk, begin, hidden, states, set(branches[k:]), limit)
                    self.counters.head_forwards += size
                    summed = self.scorer.objective.summed(self._logits(hidden), reference, chunk.ids)
                self._remember((bits, start, size), float(summed))
        return {bits: self._memo[(bits, start, size)] for bits in masks}

    def _remember(self, key: tuple, value: float) -> None:
        if len(self._memo) >= _MEMO_LIMIT:
            self._memo.clear()
        self._memo[key] = value

    def _start(self, bits: tuple[bool, ...], chunk: _Chunk, states: dict, limit: int) -> tuple[int, torch.Tensor]:
        """The deepest boundary of ``bits`` up to ``limit`` with a known state (this batch's or the cache's), and
        that state."""
        for boundary in range(min(len(bits) - 1, limit), 0, -1):
            state = states.get(bits[:boundary])
            if state is None:
                state = self.cache.get((chunk.key, bits[:boundary]))
            if state is not None:
                return boundary, state
        return 0, chunk.h0

    def _run(self, mask: KeepMask, chunk: _Chunk, begin: int, hidden: torch.Tensor, states: dict,
             keep_at: set[int], limit: int) -> torch.Tensor:
        """Residual stream after the last layer, from ``hidden`` at sublayer boundary ``begin`` on.

        States at the boundaries in ``keep_at`` go to ``states`` (later masks of this batch branch there); every
        layer boundary passed, and every split, also goes to the cross-batch cache; none past ``limit`` (the
        mask's first repaired sublayer) is stored anywhere.
        """
        keep_at = {b for b in keep_at if b <= limit}
        self.masker.apply(mask)
        layer = begin // 2
        if begin % 2:  # entering the FFN of `layer`: finish that layer with its FFN only
            if mask.keeps(layer, FFN):
                hidden = self._call(layer, hidden, chunk, mask, only=FFN)
            layer += 1
        for index in range(layer, len(self.layers)):
            if 2 * index in keep_at:
                states[mask.bits[: 2 * index]] = hidden
            if begin < 2 * index <= limit:
                self.cache.put((chunk.key, mask.bits[: 2 * index]), hidden)
            attn, ffn = mask.keeps(index, ATTN), mask.keeps(index, FFN)
            if self.splittable and 2 * index + 1 in keep_at:
                if attn:
                    hidden = self._call(index, hidden, chunk, mask, only=ATTN)
                states[mask.bits[: 2 * index + 1]] = hidden  # in keep_at: at most limit
                self.cache.put((chunk.key, mask.bits[: 2 * index + 1]), hidden)
                if ffn:
                    hidden = self._call(index, hidden, chunk, mask, only=FFN)
            elif attn or ffn:
                hidden = self._call(index, hidden, chunk, mask)
        return hidden

    def _call(self, index: int, hidden: torch.Tensor, chunk: _Chunk, mask: KeepMask, only: int | None = None):
        """One decoder layer under ``mask``, or only its ``only`` sublayer (the other one swapped out)."""
        swap = only is not None and mask.keeps(index, 1 - only)
        if swap:  # the other sublayer's stand-in, for this call only (no full re-apply)
            self.masker.swap(index, 1 - only, keep=False)
        args, kwargs = chunk.calls[index]
        try:
            out = _first(self.layers[index](hidden, *args, **kwargs))
        finally:
            if swap:
                self.masker.swap(index, 1 - only, keep=True)
        kept = (mask.keeps(index, ATTN) + mask.keeps(index, FFN)) if only is None else 1
        self.counters.sublayer_forwards += kept * len(hidden)
        return out


def make_scoring_backend(scorer: MaskScorer, *, prefix_reuse: bool = True,
                         state_cache_mb: float = DEFAULT_STATE_CACHE_MB) -> PrefixEngine | PlainBackend:
    """The in-process backend a study scores with: the prefix engine, or the plain loop."""
    return PrefixEngine(scorer, state_cache_mb=state_cache_mb) if prefix_reuse else PlainBackend(scorer)


def staged_survivors(partial: Sequence[float], keep: int) -> list[int]:
    """Indices of the ``keep`` best partial scores (ties: earlier index first), in input order."""
    ranked = sorted(range(len(partial)), key=lambda i: (partial[i], i))
    return sorted(ranked[:keep])


def _count(scorer: MaskScorer, sequences: int | None) -> int:
    total = len(scorer.input_ids)
    return total if sequences is None else max(1, min(sequences, total))


def _branch(a: tuple[bool, ...], b: tuple[bool, ...]) -> int:
    """First index where two distinct bit tuples differ."""
    return next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)


def _recorder(store: list, index: int):
    def hook(module, args, kwargs):
        if not args:
            kwargs = dict(kwargs)
            args = (kwargs.pop("hidden_states"),)
        store[index] = (tuple(args), dict(kwargs))

    return hook


def _first(output):
    return output[0] if isinstance(output, tuple) else output

