"""Per-family facts: where the decoder layers, attention, FFN and their norms live. One row per family.

A removed sublayer contributes zeros to the residual stream; the norms listed with it feed (or post-process)
only that sublayer, so they go with it on export. Adding a family is one row here plus its tiny config in
``tests/families.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn
from .errors import UserError


class UnsupportedModelError(UserError):
    """The model's architecture has no row in the family table."""


@dataclass(frozen=True)
class Family:
    """Where one architecture keeps its depth structure (attribute paths relative to the CausalLM)."""

    name: str
    layers: str  # dotted path of the decoder ModuleList
    attn: str  # attention module inside a layer
    ffn: tuple[str, ...]  # FFN module(s) inside a layer, in call order; the last one writes the residual
    attn_norms: tuple[str, ...]  # norms used only by the attention sublayer
    ffn_norms: tuple[str, ...]  # norms used only by the FFN sublayer
    residual: str = "sequential"  # "sequential": h += attn(..); h += ffn(..)   "parallel": h += attn(..) + ffn(..)
    final_norm: str = "model.norm"  # dotted path of the norm between the last decoder layer and the output head
    lora: tuple[str, ...] = ()  # projection names healing puts LoRA adapters on (removed sublayers hold none)
    # the nn.Linear each sublayer ends in, whose output is added to the residual stream as it is (dotted, in a
    # layer); training-free repair folds its map there. None: the output passes a norm first, or a mixture
    attn_out: str | None = None
    ffn_out: str | None = None
    check: Callable[[Any], str | None] | None = None  # returns a reason when a config variant is unsupported


def _opt_check(config: Any) -> str | None:
    if not getattr(config, "do_layer_norm_before", True):
        return "OPT with do_layer_norm_before=False (post-norm, e.g. opt-350m) has no removable residual branch"
    return None


def _neox_residual(config: Any) -> str:
    return "parallel" if getattr(config, "use_parallel_residual", True) else "sequential"


_PRE_NORM = dict(attn="self_attn", ffn=("mlp",), attn_norms=("input_layernorm",), ffn_norms=("post_attention_layernorm",))
_OUT = dict(attn_out="self_attn.o_proj", ffn_out="mlp.down_proj")
_QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
_SWIGLU = _QKVO + ("gate_proj", "up_proj", "down_proj")

FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "model.layers", **_PRE_NORM, **_OUT, lora=_SWIGLU),
    "mistral": Family("mistral", "model.layers", **_PRE_NORM, **_OUT, lora=_SWIGLU),
    "qwen2": Family("qwen2", "model.layers", **_PRE_NORM, **_OUT, lora=_SWIGLU),
    "qwen3": Family("qwen3", "model.layers", **_PRE_NORM, **_OUT, lora=_SWIGLU),
    "phi3": Family("phi3", "model.layers", **_PRE_NORM, **_OUT,
                   lora=("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    # the sparse MoE block is the FFN sublayer
    "mixtral": Family("mixtral", "model.layers", **_PRE_NORM, attn_out="self_attn.o_proj",
                      lora=_QKVO + ("w1", "w2", "w3")),
    "gemma2": Family(
        "gemma2", "model.layers", "self_attn", ("mlp",),
        attn_norms=("input_layernorm", "post_attention_layernorm"),
        ffn_norms=("pre_feedforward_layernorm", "post_feedforward_layernorm"), lora=_SWIGLU,
    ),
    "gpt_neox": Family(
        "gpt_neox", "gpt_neox.layers", "attention", ("mlp",),
        attn_norms=("input_layernorm",), ffn_norms=("post_attention_layernorm",), residual="parallel",
        final_norm="gpt_neox.final_layer_norm", lora=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    ),
    "gpt2": Family("gpt2", "transformer.h", "attn", ("mlp",), attn_norms=("ln_1",), ffn_norms=("ln_2",),
                   final_norm="transformer.ln_f", lora=("c_attn", "c_proj", "c_fc")),
    "opt": Family(
        "opt", "model.decoder.layers", "self_attn", ("fc1", "fc2"),
        attn_norms=("self_attn_layer_norm",), ffn_norms=("final_layer_norm",), check=_opt_check,
        attn_out="self_attn.out_proj", ffn_out="fc2",
        final_norm="model.decoder.final_layer_norm", lora=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    ),
}


def family_for(config: Any) -> Family:
    """The family row for a model config; a clear error lists the supported families otherwise."""
    model_type = getattr(config, "base_model_type", None) or getattr(config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        supported = ", ".join(sorted(FAMILIES))
        raise UnsupportedModelError(f"unsupported model architecture {model_type!r}; supported families: {supported}")
    reason = family.check(config) if family.check else None
    if reason:
        raise UnsupportedModelError(reason)
    if family.name == "gpt_neox":
        return Family(**{**family.__dict__, "residual": _neox_residual(config)})
    return family


def get_path(root: nn.Module, dotted: str) -> Any:
    """Attribute at a dotted path, e.g. ``model.layers``."""
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder ModuleList of a causal LM of a supported family."""
    return get_path(model, family_for(model.config).layers)


def kv_shape(config: Any) -> tuple[int, int]:
    """(num key/value heads, head dim) of one attention sublayer."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return kv_heads, head_dim
