"""Proxy objectives (lower is better) and the per-layer statistics the similarity strategies use.

The dense model's next-token distributions are cached once as a :class:`Reference`. Memory is bounded: with
``topk`` set, each position keeps only its k most likely tokens' log-probs plus the log of the remaining
(tail) mass, and divergences are computed on those k+1 bins. By the log-sum inequality the binned KL is a
lower bound of the full KL and equals it when the tail holds no mass; ``topk=None`` keeps the full vocabulary
in float32 (exact). ``Reference.nbytes`` says what it holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .registry import Registry


@dataclass
class Reference:
    """Dense-model log-probs for every predicted position of a token batch ([N, bins] flattened)."""

    logp: torch.Tensor  # [N, V] full, or [N, k] top-k log-probs
    index: torch.Tensor | None  # [N, k] token ids of the top-k bins (None: full vocabulary)
    log_tail: torch.Tensor | None  # [N] log of the mass outside the top-k

    @classmethod
    def from_logits(cls, logits: torch.Tensor, topk: int | None = None) -> Reference:
        logp = _flat_logp(logits)
        if topk is None or topk >= logp.shape[-1]:
            return cls(logp.float(), None, None)
        values, index = logp.topk(topk, dim=-1)
        return cls(values.float(), index, _log1mexp(values.float().logsumexp(-1)))

    @property
    def nbytes(self) -> int:
        parts = [self.logp, self.index, self.log_tail]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def slice(self, rows: slice) -> Reference:
        """The reference for a contiguous range of flattened positions."""
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return Reference(self.logp[rows], pick(self.index), pick(self.log_tail))

    def bins(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(dense, masked) log-probs over the same bins, given the masked model's logits."""
        logq = _flat_logp(logits).float()
        if self.index is None:
            return self.logp, logq
        q_top = logq.gather(-1, self.index)
        q_tail = _log1mexp(q_top.logsumexp(-1))
        p = torch.cat([self.logp, self.log_tail[:, None]], dim=-1)
        q = torch.cat([q_top, q_tail[:, None]], dim=-1)
        return p, q


def _flat_logp(logits: torch.Tensor) -> torch.Tensor:
    """Log-probs of every position that predicts a next token, flattened to [N, V]."""
    return F.log_softmax(logits[:, :-1].float(), dim=-1).reshape(-1, logits.shape[-1])


def _log1mexp(log_mass: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, clamped so an empty tail stays finite."""
    return torch.log1p(-log_mass.exp().clamp(max=1 - 1e-7))


def _kl_rows(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    return (logp.exp() * (logp - logq)).sum(-1)


# objective functions: (masked logits [B, T, V], reference, input ids [B, T]) -> per-position values summed ---
def kl(logits: torch.Tensor, reference: Reference, input_ids: torch.Tensor) -> torch.Tensor:
    """Sum over positions of KL(dense || masked)."""
    p, q = reference.bins(logits)
    return _kl_rows(p, q).sum()


def js(logits: torch.Tensor, reference: Reference, input_ids: torch.Tensor) -> torch.Tensor:
    """Sum over positions of the Jensen-Shannon divergence (FinerCut's default)."""
    p, q = reference.bins(logits)
    m = torch.logaddexp(p, q) - math.log(2.0)
    return (0.5 * _kl_rows(p, m) + 0.5 * _kl_rows(q, m)).sum()


def nll(logits: torch.Tensor, reference: Reference | None, input_ids: torch.Tensor) -> torch.Tensor:
    """Sum over positions of the next-token negative log-likelihood (reported as perplexity)."""
    logq = _flat_logp(logits)
    return -logq.gather(-1, input_ids[:, 1:].reshape(-1, 1)).sum()


@dataclass(frozen=True)
class Objective:
    """A proxy objective: a per-position sum, turned into the reported value by ``finish``."""

    name: str
    summed: Callable[[torch.Tensor, Reference | None, torch.Tensor], torch.Tensor]
    finish: Callable[[float], float] = lambda mean: mean
    needs_reference: bool = True


OBJECTIVES: Registry[Objective] = Registry("objective")
OBJECTIVES.add("kl", Objective("kl", kl))
OBJECTIVES.add("js", Objective("js", js))
OBJECTIVES.add("ppl", Objective("ppl", nll, finish=math.exp, needs_reference=False))


# per-layer statistics from hidden states (list of L+1 tensors [B, T, H]: the inputs of layers 0..L-1 and the
# output of the last layer, before the final norm) ---------------------------------------------------------
def _angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    cos = F.cosine_similarity(a.float(), b.float(), dim=-1).clamp(-1.0, 1.0)
    return torch.arccos(cos) / math.pi


def angular_distances(hidden: list[torch.Tensor], n: int, last_token_only: bool = True) -> torch.Tensor:
    """Gromov et al.: d(l, l+n) = arccos(cos(h_l, h_{l+n})) / pi, mean over sequences (and tokens)."""
    if not 1 <= n < len(hidden):
        raise ValueError(f"block size n={n} must be between 1 and {len(hidden) - 1}")
    pick = (lambda h: h[:, -1]) if last_token_only else (lambda h: h)
    return torch.stack([_angle(pick(hidden[l]), pick(hidden[l + n])).mean() for l in range(len(hidden) - n)])


def block_influence(hidden: list[torch.Tensor]) -> torch.Tensor:
    """ShortGPT: BI_l = 1 - mean cos(input_l, output_l), over all tokens."""
    return torch.stack(
        [1 - F.cosine_similarity(hidden[l].float(), hidden[l + 1].float(), dim=-1).mean() for l in range(len(hidden) - 1)]
    )
