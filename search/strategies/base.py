"""The one interface every search strategy implements, and the strategy registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

from objectives.registry import Registry
from surgery.errors import UserError
from surgery.mask import KeepMask

if TYPE_CHECKING:
    from search.evaluation.context import SearchContext, StrategyRun


class StrategySettingsError(UserError):
    """A strategy setting with a bad value (the message names the setting)."""


class Strategy(ABC):
    """Proposes keep-masks; every mask it evaluates goes through ``run.evaluate`` / ``run.evaluate_many``.

    Subclasses take their settings as keyword-only constructor arguments (validated there with the checks of
    ``_common``, raising :class:`StrategySettingsError`) and implement :meth:`search`, returning the best mask
    found for each budget target (``None`` where the strategy cannot produce one; say why with ``run.note``).
    What the study needs to know about a method is declared here, not keyed by its name elsewhere:
    ``selection_only``, ``own_objective`` and :meth:`expected_evaluations`.
    """

    name: ClassVar[str] = ""
    #: Every ``run.evaluate_many`` batch only picks its best mask, so exact racing and staged selection
    #: (``engine.racing`` / ``engine.staged``) may leave the others unfinished.
    selection_only: ClassVar[bool] = False
    #: The objective the method's paper scores with (an ``objectives.proxy`` name), where it has one; the study's
    #: objective is used regardless, with a note when they differ.
    own_objective: ClassVar[str | None] = None
    #: A published method the project reproduces as a baseline (FinerCut, SLEB, ...); False for the project's own
    #: search. The report compares the best of each group on held-out text.
    seed_method: ClassVar[bool] = False

    @abstractmethod
    def search(self, run: StrategyRun) -> dict[float, KeepMask | None]:
        """The best mask found for each of ``run.targets`` (None where there is none; ``run.note`` says why)."""

    def expected_evaluations(self, ctx: SearchContext) -> int | None:
        """Upper bound of ``run.evaluations`` for ``ctx`` (progress bars, tests); None when unknown."""
        return None

    def note_objective(self, run: StrategyRun) -> None:
        """Note on ``run`` when the study's objective is not the method's own."""
        objective = run.scorer.objective.name
        if self.own_objective and objective != self.own_objective:
            run.note(f"{run.strategy}: scored by the study objective {objective!r} "
                     f"(the method's own is {self.own_objective!r})")

    @classmethod
    def from_settings(cls, settings: dict) -> Strategy:
        try:
            return cls(**settings)
        except TypeError as error:
            raise StrategySettingsError(f"strategy {cls.name!r}: {error}") from None


STRATEGIES: Registry[type[Strategy]] = Registry("strategy")


def register(name: str):
    """Class decorator: ``@register("greedy_finercut")``."""

    def wrap(cls: type[Strategy]) -> type[Strategy]:
        if not issubclass(cls, Strategy):
            raise TypeError(f"{cls.__name__} is not a Strategy")
        cls.name = name
        return STRATEGIES.add(name, cls)

    return wrap
