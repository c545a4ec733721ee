"""The one interface every search strategy implements, and the strategy registry."""

from __future__ import annotations

import functools
import inspect
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

from pydantic import ConfigDict, ValidationError, validate_call

from objectives.registry import Registry, did_you_mean
from surgery.errors import UserError
from surgery.mask import KeepMask

if TYPE_CHECKING:
    from search.evaluation.context import SearchContext, StrategyRun


class StrategySettingsError(UserError):
    """A strategy setting with a bad value (the message names the setting)."""


def settings_message(strategy: str, known: list[str], error: ValidationError) -> str:
    """One line naming every bad setting of ``strategy``, its value and what it must be."""
    parts = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        if item["type"] == "unexpected_keyword_argument":
            hint = did_you_mean(key, known, list_known=False)
            parts.append(f"unknown setting {key!r}{hint} (its settings: {', '.join(known) or 'none'})")
        else:
            message = item["msg"][:1].lower() + item["msg"][1:]
            parts.append(f"setting {key!r}: {message} (got {item.get('input')!r})")
    return f"strategy {strategy!r}: " + "; ".join(parts)


def _validated(init):
    """``init`` with its annotated settings validated by pydantic; a bad one is a :class:`StrategySettingsError`."""
    checked = validate_call(init, config=ConfigDict(allow_inf_nan=False, arbitrary_types_allowed=True))
    known = [name for name in inspect.signature(init).parameters if name != "self"]

    @functools.wraps(init)
    def wrapper(self, **settings):
        try:
            checked(self, **settings)
        except ValidationError as error:
            raise StrategySettingsError(settings_message(type(self).name or type(self).__name__, known, error)) \
                from None

    return wrapper


class Strategy(ABC):
    """Proposes keep-masks; every mask it evaluates goes through ``run.evaluate`` / ``run.evaluate_many``.

    Subclasses take their settings as keyword-only constructor arguments annotated with the setting types of
    ``_common`` (validated by pydantic on every call, a bad one raising :class:`StrategySettingsError`) and
    implement :meth:`search`, returning the best mask
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

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _validated(cls.__dict__["__init__"])

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
        """The strategy with the config's ``settings`` (validated: :class:`StrategySettingsError` names each bad
        one)."""
        return cls(**settings)


STRATEGIES: Registry[type[Strategy]] = Registry("strategy")


def register(name: str):
    """Class decorator: ``@register("greedy_finercut")``."""

    def wrap(cls: type[Strategy]) -> type[Strategy]:
        if not issubclass(cls, Strategy):
            raise TypeError(f"{cls.__name__} is not a Strategy")
        cls.name = name
        return STRATEGIES.add(name, cls)

    return wrap
