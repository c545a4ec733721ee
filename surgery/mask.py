"""KeepMask: which attention (A) and FFN (M) sublayers of each decoder layer stay.

Text form: one item per layer, comma separated; ``A`` keeps attention, ``M`` keeps the FFN and ``-`` marks a
removed sublayer, e.g. ``"AM,A-,-M,--"`` (layer 3 removed entirely). Layer indices are 0-based everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator
from .errors import UserError

ATTN, FFN = 0, 1
KIND_NAMES = ("attn", "ffn")
_ITEMS = {"AM": (True, True), "A-": (True, False), "-M": (False, True), "--": (False, False)}


class MaskError(UserError):
    """A keep-mask that cannot be parsed or does not fit the model."""


@dataclass(frozen=True, slots=True)
class KeepMask:
    """Immutable keep bits for 2L sublayers, ordered layer by layer: (attn_0, ffn_0, attn_1, ffn_1, ...)."""

    bits: tuple[bool, ...]

    def __post_init__(self) -> None:
        if len(self.bits) == 0 or len(self.bits) % 2:
            raise MaskError(f"a keep-mask needs 2 bits per layer, got {len(self.bits)} bits")
        object.__setattr__(self, "bits", tuple(bool(b) for b in self.bits))

    # construction ------------------------------------------------------------------------------------------
    @classmethod
    def dense(cls, num_layers: int) -> KeepMask:
        """All sublayers kept."""
        return cls((True,) * (2 * num_layers))

    @classmethod
    def parse(cls, text: str, num_layers: int | None = None) -> KeepMask:
        """Parse ``"AM,A-,-M,--"``; errors name the 0-based layer position and the bad item."""
        items = [item.strip() for item in str(text).split(",")]
        bits: list[bool] = []
        for position, item in enumerate(items):
            if item.upper() not in _ITEMS:
                raise MaskError(
                    f"bad mask item {item!r} at layer {position} of {text!r}: expected one of AM, A-, -M, --"
                )
            bits.extend(_ITEMS[item.upper()])
        mask = cls(tuple(bits))
        if num_layers is not None:
            mask.check_layers(num_layers)
        return mask

    @classmethod
    def from_removed(cls, num_layers: int, removed: Iterable[int]) -> KeepMask:
        """Mask with the given flat sublayer indices (2*layer + kind) removed."""
        bits = [True] * (2 * num_layers)
        for index in removed:
            if not 0 <= index < len(bits):
                raise MaskError(f"sublayer index {index} out of range for {num_layers} layers")
            bits[index] = False
        return cls(tuple(bits))

    @classmethod
    def from_layers(cls, num_layers: int, removed_layers: Iterable[int]) -> KeepMask:
        """Mask with whole layers (both sublayers) removed."""
        removed = [2 * layer + kind for layer in removed_layers for kind in (ATTN, FFN)]
        return cls.from_removed(num_layers, removed)

    # views -------------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.bits) // 2

    def keeps(self, layer: int, kind: int) -> bool:
        return self.bits[2 * layer + kind]

    def layer_items(self) -> Iterator[tuple[bool, bool]]:
        for layer in range(self.num_layers):
            yield self.bits[2 * layer], self.bits[2 * layer + 1]

    @property
    def removed(self) -> tuple[int, ...]:
        """Flat indices (2*layer + kind) of removed sublayers."""
        return tuple(i for i, keep in enumerate(self.bits) if not keep)

    @property
    def kept(self) -> tuple[int, ...]:
        return tuple(i for i, keep in enumerate(self.bits) if keep)

    @property
    def num_removed(self) -> int:
        return len(self.bits) - sum(self.bits)

    @property
    def removed_attn(self) -> int:
        return sum(not a for a, _ in self.layer_items())

    @property
    def removed_ffn(self) -> int:
        return sum(not m for _, m in self.layer_items())

    @property
    def removed_layers(self) -> tuple[int, ...]:
        """Layers whose attention and FFN are both removed."""
        return tuple(i for i, (a, m) in enumerate(self.layer_items()) if not a and not m)

    @property
    def whole_layers_only(self) -> bool:
        """True when every layer is either fully kept or fully removed."""
        return all(a == m for a, m in self.layer_items())

    # edits -------------------------------------------------------------------------------------------------
    def without(self, index: int) -> KeepMask:
        """Copy with flat sublayer ``index`` removed."""
        bits = list(self.bits)
        bits[index] = False
        return KeepMask(tuple(bits))

    def with_kept(self, index: int) -> KeepMask:
        bits = list(self.bits)
        bits[index] = True
        return KeepMask(tuple(bits))

    def check_layers(self, num_layers: int) -> None:
        if self.num_layers != num_layers:
            raise MaskError(f"mask {self} has {self.num_layers} layers but the model has {num_layers}")

    def first_difference(self, other: KeepMask) -> int | None:
        """Flat index of the first sublayer where two masks differ (None when equal)."""
        for index, (a, b) in enumerate(zip(self.bits, other.bits)):
            if a != b:
                return index
        return None

    def __str__(self) -> str:
        return ",".join(("A" if a else "-") + ("M" if m else "-") for a, m in self.layer_items())

    def __repr__(self) -> str:
        return f"KeepMask({str(self)!r})"


def sublayer_name(index: int) -> str:
    """Human name of a flat sublayer index, e.g. 7 -> 'L3.ffn'."""
    return f"L{index // 2}.{KIND_NAMES[index % 2]}"
