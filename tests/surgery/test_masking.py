"""Runtime masking on a tiny model of every family: exact against the dense model and hand-written residuals."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from surgery.families import FAMILIES, UnsupportedModelError, family_for, get_path
from surgery.mask import KeepMask
from surgery.masking import masked, masker_for
from tests.families import CASES, input_ids

LAYER = 1  # the probed layer: inside the stack, so its input already went through masking-free layers


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _probe(model, case, mask: str):
    """(layer input h, attention module output, layer output) of layer LAYER under ``mask``."""
    family = family_for(model.config)
    layer = get_path(model, family.layers)[LAYER]
    seen: dict[str, torch.Tensor] = {}

    def store(key, pick):
        def hook(*args):
            seen.setdefault(key, pick(*args))

        return hook

    hooks = [
        layer.register_forward_pre_hook(
            store("h", lambda m, args, kwargs: args[0] if args else kwargs["hidden_states"]), with_kwargs=True),
        layer.register_forward_hook(store("out", lambda m, args, out: _first(out))),
        getattr(layer, family.attn).register_forward_hook(store("attn", lambda m, args, out: _first(out))),
    ]
    try:
        with torch.no_grad(), masked(model, mask):
            model(input_ids())
    finally:
        for hook in hooks:
            hook.remove()
    return layer, seen


def test_every_table_family_has_a_tiny_case():
    assert sorted(case.name for case in CASES) == sorted(FAMILIES)


def test_all_keep_is_exactly_dense(case, tiny):
    model = tiny(case)
    with torch.no_grad():
        dense = model(input_ids()).logits
        with masked(model, KeepMask.dense(3)):
            kept = model(input_ids()).logits
    assert torch.equal(dense, kept)


def test_dense_layer_matches_table_residual_wiring(case, tiny):
    model = tiny(case)
    layer, seen = _probe(model, case, "AM,AM,AM")
    h, attn = seen["h"], case.attn_post(layer, seen["attn"])
    with torch.no_grad():
        if family_for(model.config).residual == "parallel":
            expected = h + attn + case.ffn_branch(layer, h)
        else:
            expected = (h + attn) + case.ffn_branch(layer, h + attn)
    torch.testing.assert_close(seen["out"], expected, atol=1e-5, rtol=1e-5)


def test_removed_attention_is_h_plus_ffn(case, tiny):
    model = tiny(case)
    layer, seen = _probe(model, case, "AM,-M,AM")
    with torch.no_grad():
        expected = seen["h"] + case.ffn_branch(layer, seen["h"])
    assert not torch.allclose(seen["out"], seen["h"], atol=1e-3)  # the FFN branch really contributes
    torch.testing.assert_close(seen["out"], expected, atol=1e-6, rtol=1e-6)


def test_removed_ffn_is_h_plus_attention(case, tiny):
    model = tiny(case)
    layer, seen = _probe(model, case, "AM,A-,AM")
    expected = seen["h"] + case.attn_post(layer, seen["attn"])
    torch.testing.assert_close(seen["out"], expected, atol=1e-6, rtol=1e-6)


def test_removed_layer_is_identity(case, tiny):
    model = tiny(case)
    _, seen = _probe(model, case, "AM,--,AM")
    assert torch.equal(seen["out"], seen["h"])


def test_restore_is_exactly_dense_and_reuses_modules(case, tiny):
    model = tiny(case)
    layers = get_path(model, family_for(model.config).layers)
    before = [id(m) for m in layers.modules()]
    with torch.no_grad():
        dense = model(input_ids()).logits
        for mask in ("-M,A-,--", "A-,--,-M"):
            with masked(model, mask):
                assert not torch.allclose(model(input_ids()).logits, dense)
        masker_for(model).apply(KeepMask.parse("-M,-M,A-"))
        masker_for(model).restore()
        after = model(input_ids()).logits
    assert torch.equal(dense, after)
    assert [id(m) for m in layers.modules()] == before


def _same_generation(model, mask):
    prompt = input_ids(batch=1, seq=6)
    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad(), masked(model, mask):
        cached = model.generate(prompt, use_cache=True, **settings)
        uncached = model.generate(prompt, use_cache=False, **settings)
    assert torch.equal(cached, uncached)


def test_generate_with_cache_equals_without_cache(case, tiny):
    _same_generation(tiny(case), "-M,A-,--")  # no attention in layer 0, no FFN in layer 1, no layer 2


@pytest.mark.parametrize("family", ["gpt2", "opt"])  # learned absolute positions: the cache length still counts
def test_generate_without_any_attention(family, tiny):
    _same_generation(tiny(family), "-M,-M,-M")


def test_unsupported_family_lists_supported_ones():
    config = tf.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=16, is_decoder=True)
    model = tf.BertLMHeadModel(config)
    with pytest.raises(UnsupportedModelError) as error:
        masker_for(model)
    assert "'bert'" in str(error.value) and "gemma2, gpt2, gpt_neox, llama" in str(error.value)
    with pytest.raises(UnsupportedModelError, match="'t5'"):
        family_for(tf.T5Config())


def test_post_norm_opt_is_rejected():
    with pytest.raises(UnsupportedModelError, match="do_layer_norm_before=False"):
        family_for(tf.OPTConfig(do_layer_norm_before=False))


def test_mask_length_must_match_model(tiny):
    model = tiny("llama")
    with pytest.raises(ValueError, match="has 2 layers but the model has 3"):
        with masked(model, "AM,AM"):
            pass
