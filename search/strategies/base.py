"""The one interface every search strategy implements, and the strategy registry."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from objectives.registry import Registry
from surgery.mask import KeepMask
from surgery.errors import UserError

if TYPE_CHECKING:
    from search.context import StrategyRun


class StrategySettingsError(UserError):
    """A strategy setting with a bad value (the message names the setting)."""


class Strategy:
    """Proposes keep-masks; every mask it evaluates goes through ``run.evaluate`` / ``run.evaluate_many``.

    Subclasses take their settings as keyword-only constructor arguments (validated there, raising
    :class:`StrategySettingsError`) and implement :meth:`search`, returning the best mask found for each
    budget target (``None`` where the strategy cannot produce one; say why with ``run.note``).
    """

    name: ClassVar[str] = ""

    def search(self, run: StrategyRun) -> dict[float, KeepMask | None]:
        raise NotImplementedError

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
