"""Stand-ins for removed sublayers, and the model class of exported partially-pruned models.

This file imports only torch and transformers: the export copies it next to the weights so that
``from_pretrained(..., trust_remote_code=True)`` works without this package installed.
"""

from __future__ import annotations

import torch
from torch import nn


class SkippedAttention(nn.Module):
    """A removed attention sublayer: adds nothing to the residual stream, computes nothing, holds no weights."""

    def forward(self, hidden_states=None, *args, **kwargs):
        if hidden_states is None:
            hidden_states = args[0]
        return torch.zeros_like(hidden_states), None


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


def cache_sharing_modes(keep_attn: list[bool]) -> list[str | None] | None:
    """Per-layer KV-cache modes: layers without attention get a cache layer that stores nothing ("reuse").

    ``None`` when every layer (or none) keeps its attention: the default cache is right then.
    """
    if all(keep_attn) or not any(keep_attn):
        return None
    return [None if keep else "reuse" for keep in keep_attn]


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
    for layer, item in zip(layers, items):
        if item[0] == "-":
            setattr(layer, spec["attn"], SkippedAttention())
            for name in spec["attn_norms"]:
                setattr(layer, name, nn.Identity())
        if item[1] == "-":
            stand_ins = ffn_stand_ins([getattr(layer, name) for name in spec["ffn"]])
            for name, module in zip(spec["ffn"], stand_ins):
                setattr(layer, name, module)
            for name in spec["ffn_norms"]:
                setattr(layer, name, nn.Identity())


def _base_classes(base_type: str) -> tuple[type, type]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    base_config = CONFIG_MAPPING[base_type]
    return base_config, MODEL_FOR_CAUSAL_LM_MAPPING[base_config]


def _camel(base_config: type) -> str:
    return base_config.__name__.removesuffix("Config")


def _make_config_class(base_type: str, base_config: type) -> type:
    class Config(base_config):
        model_type = PREFIX + base_type
        base_model_type = base_type
        depth_pruning: dict | None = None

        @property
        def kv_sharing_modes(self):
            spec = self.depth_pruning or {}
            return cache_sharing_modes([item[0] != "-" for item in spec.get("keep", "").split(",") if item])

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
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    for suffix, which in (("Config", 0), ("ForCausalLM", 1)):
        if name.startswith("DepthPruned") and name.endswith(suffix):
            camel = name.removeprefix("DepthPruned").removesuffix(suffix)
            for base_type, config_name in CONFIG_MAPPING_NAMES.items():
                if config_name == camel + "Config":
                    return pruned_classes(base_type)[which]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
