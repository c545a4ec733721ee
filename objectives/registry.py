"""A small name -> item registry: rejects duplicates and answers unknown names with a close match."""

from __future__ import annotations

import difflib
from typing import Generic, Iterable, Iterator, TypeVar
from surgery.errors import UserError

T = TypeVar("T")


class UnknownNameError(UserError, KeyError):
    """A name not in a registry (a user error, and a lookup miss); the message suggests the closest name."""

    def __str__(self) -> str:
        return str(self.args[0])


def did_you_mean(name: str, choices: Iterable[str], *, n: int = 1, cutoff: float = 0.6,
                 list_known: bool = True) -> str:
    """``"; did you mean 'x'?"`` with up to ``n`` close names; else ``"; known: a, b"`` (or ``""``)."""
    choices = list(dict.fromkeys(choices))
    close = difflib.get_close_matches(str(name), choices, n=n, cutoff=cutoff)
    if close:
        return f"; did you mean {', '.join(repr(c) for c in close)}?"
    return f"; known: {', '.join(sorted(choices))}" if list_known else ""


class Registry(Generic[T]):
    """Named items of one kind (strategies, objectives, budgets, ...)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = item
        return item

    def register(self, name: str):
        """Decorator form of :meth:`add`."""

        def wrap(item: T) -> T:
            return self.add(name, item)

        return wrap

    def get(self, name: str) -> T:
        if name not in self._items:
            raise UnknownNameError(f"unknown {self.kind} {name!r}{did_you_mean(name, self._items)}")
        return self._items[name]

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)
