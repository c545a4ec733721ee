"""KeepMask: text form, validation messages, counts, equality and hashing."""

from __future__ import annotations

import pytest

from surgery.mask import ATTN, FFN, KeepMask, MaskError, sublayer_name


def test_text_round_trip_and_bits():
    mask = KeepMask.parse("AM,A-,-M,--")
    assert mask.bits == (True, True, True, False, False, True, False, False)
    assert str(mask) == "AM,A-,-M,--"
    assert KeepMask.parse(" am , a- ,-m,-- ") == mask  # case and spaces tolerated
    assert repr(mask) == "KeepMask('AM,A-,-M,--')"


def test_counts():
    mask = KeepMask.parse("AM,A-,-M,--")
    assert mask.num_layers == 4
    assert mask.num_removed == 4 and len(mask.kept) == 4
    assert mask.removed == (3, 4, 6, 7)
    assert (mask.removed_attn, mask.removed_ffn) == (2, 2)
    assert mask.removed_layers == (3,)
    assert not mask.whole_layers_only
    assert KeepMask.parse("AM,--,AM").whole_layers_only
    assert mask.keeps(1, ATTN) and not mask.keeps(1, FFN)
    assert sublayer_name(7) == "L3.ffn"


def test_constructors_agree():
    assert KeepMask.dense(3) == KeepMask.parse("AM,AM,AM")
    assert KeepMask.from_removed(3, [1, 2]) == KeepMask.parse("A-,-M,AM")
    assert KeepMask.from_layers(3, [1]) == KeepMask.parse("AM,--,AM")
    assert KeepMask.dense(3).without(5) == KeepMask.parse("AM,AM,A-")
    assert KeepMask.parse("A-,AM").with_kept(1) == KeepMask.dense(2)
    assert KeepMask.parse("AM,A-").first_difference(KeepMask.parse("AM,--")) == 2
    assert KeepMask.dense(2).first_difference(KeepMask.dense(2)) is None


def test_equality_and_hashing():
    a, b = KeepMask.parse("AM,-M"), KeepMask.from_removed(2, [2])
    assert a == b and hash(a) == hash(b)
    assert len({a, b, KeepMask.dense(2)}) == 2
    with pytest.raises(AttributeError):
        a.bits = (True,) * 4  # frozen


@pytest.mark.parametrize(
    "text, position, item",
    [("AM,AX,--", 1, "'AX'"), ("AM,,AM", 1, "''"), ("MA", 0, "'MA'"), ("AM,A-,-M,-", 3, "'-'"), ("AM;A-", 0, "'AM;A-'")],
)
def test_parse_errors_name_position_and_item(text, position, item):
    with pytest.raises(MaskError) as error:
        KeepMask.parse(text)
    message = str(error.value)
    assert f"layer {position}" in message and item in message and "AM, A-, -M, --" in message


def test_wrong_lengths():
    with pytest.raises(MaskError, match="has 2 layers but the model has 5"):
        KeepMask.parse("AM,A-", num_layers=5)
    with pytest.raises(MaskError, match="2 bits per layer, got 3"):
        KeepMask((True, False, True))
    with pytest.raises(MaskError, match="got 0 bits"):
        KeepMask(())
    with pytest.raises(MaskError, match="sublayer index 6 out of range for 3 layers"):
        KeepMask.from_removed(3, [6])
    assert issubclass(MaskError, ValueError)
