"""A least-recently-used cache bounded in bytes: the prefix engine's residual-stream states and the scorer's
repair fits are both kept in one."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generic, Hashable, TypeVar

V = TypeVar("V")


def tensor_bytes(tensor) -> int:
    """The bytes a tensor's elements take."""
    return tensor.numel() * tensor.element_size()


class BytesLRU(Generic[V]):
    """Values by key, least recently used out first once their ``size`` sum passes ``limit_bytes``; a value larger
    than the limit is not kept, and a key already held keeps its value."""

    def __init__(self, limit_bytes: float, size: Callable[[V], int]):
        self.limit_bytes = max(0, int(limit_bytes))
        self.bytes = 0
        self.hits = 0
        self._size = size
        self._items: OrderedDict[Hashable, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, key: Hashable, value: V) -> None:
        size = self._size(value)
        if size > self.limit_bytes or key in self._items:
            return
        self._items[key] = value
        self.bytes += size
        while self.bytes > self.limit_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= self._size(old)

    def get(self, key: Hashable) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
            self.hits += 1
        return value
