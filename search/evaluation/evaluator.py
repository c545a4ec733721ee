"""The one interface of everything that scores masks for a study: the prefix-reuse engine, the plain loop, the
process pool and the Ray actors (``SearchContext.evaluator``)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

from surgery.mask import KeepMask


@dataclass
class EngineCounters:
    sublayer_forwards: int = 0  # kept sublayers computed x sequences
    head_forwards: int = 0  # final norm + head + objective, x sequences
    captures: int = 0  # dense forwards spent capturing layer arguments
    extra: dict[str, Any] = field(default_factory=dict)


class Evaluator(ABC):
    """Scores batches of masks with the study's scorer; ``counters`` holds the forwards it really computed.

    ``races`` declares whether :meth:`race` saves work (exact racing, ``engine.racing``); an evaluator that does
    not race answers it by scoring every mask in full, and the run takes the plain path instead.
    """

    races: ClassVar[bool] = False

    def __init__(self) -> None:
        self.counters = EngineCounters()

    @abstractmethod
    def score_many(self, masks: Sequence[KeepMask], sequences: int | None = None) -> list[float]:
        """Objective of each mask on the first ``sequences`` calibration sequences (all by default)."""

    def race(self, masks: Sequence[KeepMask], best_known: float = math.inf) -> list[float]:
        """Full objective of every mask that can still beat ``best_known`` and the others, ``inf`` for the rest."""
        return self.score_many(masks)

    def close(self) -> None:
        """Release what the evaluator holds (workers); it starts them again when used."""
