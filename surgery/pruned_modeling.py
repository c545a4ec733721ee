"""Stand-ins for removed sublayers, and the model class of exported partially-pruned models.

This file imports only torch and transformers: the export copies it next to the weights so that
``from_pretrained(..., trust_remote_code=True)`` works without this package installed.
"""

from __future__ import annotations

import torch
from torch import nn


class SkippedAttention(nn.Module):
    """A removed attention sublayer: adds nothing to the residual stream, holds no weights.

    Under a KV cache it still appends a one-number-per-token placeholder (one head of width 1) to its layer of the
    cache through the public ``Cache.update``, so that every layer of the cache reports the true sequence length
    (transformers reads it from layer 0, and learned absolute positions read it too). The placeholder costs
    ``1 / (kv_heads * head_dim)`` of a kept layer's cache.
    """

    def __init__(self, layer_idx: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states=None, *args, **kwargs):
        if hidden_states is None:
            hidden_states = args[0]
        cache = _find_cache(args, kwargs)
        if cache is not None and self.layer_idx is not None:
            placeholder = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            cache.update(placeholder, placeholder, self.layer_idx)
        return torch.zeros_like(hidden_states), None

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}"


def _find_cache(args: tuple, kwargs: dict):
    """The KV cache handed to an attention module, whatever the release calls the argument."""
    from transformers import Cache

    for value in (*kwargs.values(), *args):
        if isinstance(value, Cache):
            return value
    return None


class SkippedFFN(nn.Module):
    """A removed FFN sublayer (or one of its parts): returns zeros with ``out_features`` last dim.

    For FFNs made of several modules (OPT's fc1 -> act -> fc2) the inner parts return an empty last dim, so no
    compute or memory is spent; the last part returns zeros of the hidden size.
    """

    def __init__(self, out_features: int | None = None):
        super().__init__()
        self.out_features = out_features

    def forward(self, hidden_states, *args, **kwargs):
        width = hidden_states.shape[-1] if self.out_features is None else self.out_features
        return hidden_states.new_zeros(*hidden_states.shape[:-1], width)

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}"


def ffn_stand_ins(parts: list[nn.Module]) -> list[SkippedFFN]:
    """Stand-ins for the modules of one FFN sublayer, in call order; the last one writes the residual width."""
    last = getattr(parts[-1], "out_features", None)  # a bare Linear (OPT's fc2) knows its output width
    return [SkippedFFN(last if i == len(parts) - 1 else 0) for i in range(len(parts))]


# exported partially-pruned models ----------------------------------------------------------------------------
# ``config.depth_pruning`` says what was removed, in the family's own attribute names:
#   {"keep": "AM,A-,-M", "layers": "model.layers", "attn": "self_attn", "ffn": ["mlp"],
#    "attn_norms": ["input_layernorm"], "ffn_norms": ["post_attention_layernorm"], ...}
# A removed sublayer becomes a weightless stand-in and the norms that fed only it become nn.Identity, so the
# state dict holds exactly the kept weights.

PREFIX = "depthpruned_"
_CLASSES: dict[str, type] = {}


def _get(root: nn.Module, dotted: str):
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


def prune_sublayers(model: nn.Module, spec: dict) -> None:
    """Swap the sublayers ``spec["keep"]`` removes (and their norms) for weightless modules, in place."""
    layers = _get(model, spec["layers"])
    items = spec["keep"].split(",")
    if len(items) != len(layers):
        raise ValueError(f"depth_pruning keep {spec['keep']!r} has {len(items)} layers, the model {len(layers)}")
    for index, (layer, item) in enumerate(zip(layers, items)):
        if item[0] == "-":
            setattr(layer, spec["attn"], SkippedAttention(cache_layer_index(getattr(layer, spec["attn"]), index)))
            for name in spec["attn_norms"]:
                setattr(layer, name, nn.Identity())
        if item[1] == "-":
            stand_ins = ffn_stand_ins([getattr(layer, name) for name in spec["ffn"]])
            for name, module in zip(spec["ffn"], stand_ins):
                setattr(layer, name, module)
            for name in spec["ffn_norms"]:
                setattr(layer, name, nn.Identity())


def cache_layer_index(attention: nn.Module, position: int) -> int:
    """The cache layer an attention module writes to (its ``layer_idx``; its position in the stack otherwise)."""
    index = getattr(attention, "layer_idx", None)
    return position if index is None else int(index)


def _base_classes(base_type: str) -> tuple[type, type]:
    from transformers import CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING

    base_config = CONFIG_MAPPING[base_type]
    return base_config, MODEL_FOR_CAUSAL_LM_MAPPING[base_config]


def _camel(base_config: type) -> str:
    return base_config.__name__.removesuffix("Config")


def _make_config_class(base_type: str, base_config: type) -> type:
    class Config(base_config):
        model_type = PREFIX + base_type
        base_model_type = base_type
        depth_pruning: dict | None = None

    Config.__name__ = Config.__qualname__ = f"DepthPruned{_camel(base_config)}Config"
    Config.__module__ = __name__
    return Config


def _make_model_class(config_class: type, base_model: type) -> type:
    class Model(base_model):
        def __init__(self, config):
            super().__init__(config)
            prune_sublayers(self, config.depth_pruning)

    Model.config_class = config_class
    Model.__name__ = Model.__qualname__ = config_class.__name__.removesuffix("Config") + "ForCausalLM"
    Model.__module__ = __name__
    return Model


def pruned_classes(base_type: str) -> tuple[type, type]:
    """(config class, CausalLM class) of partially pruned models of one family, registered with the Auto classes."""
    if base_type not in _CLASSES:
        from transformers import AutoConfig, AutoModelForCausalLM

        base_config, base_model = _base_classes(base_type)
        config_class = _make_config_class(base_type, base_config)
        model_class = _make_model_class(config_class, base_model)
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)
        _CLASSES[base_type] = (config_class, model_class)
    return _CLASSES[base_type]


def __getattr__(name: str):
    """``DepthPrunedLlamaConfig`` / ``DepthPrunedLlamaForCausalLM``: built on first access (the auto_map names)."""
    import transformers

    for suffix, which in (("Config", 0), ("ForCausalLM", 1)):
        if name.startswith("DepthPruned") and name.endswith(suffix):
            camel = name.removeprefix("DepthPruned").removesuffix(suffix)
            base_config = getattr(transformers, camel + "Config", None)
            if isinstance(base_config, type) and getattr(base_config, "model_type", ""):
                return pruned_classes(base_config.model_type)[which]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
