"""DeciLM (``nemotron-nas``) configuration and model for depth-pruned Llama-family checkpoints.

Written next to the weights of a ``--format decilm`` export (with ``pruned_modeling.py``), so that
``from_pretrained(dir, trust_remote_code=True)`` loads it in transformers and vLLM finds its configuration class.
Each entry of ``config.block_configs`` says whether a layer's attention and FFN are there (``no_op``); a removed
sublayer has no weights and adds nothing to the residual stream. Kept sublayers all have the source model's
widths (``n_heads_in_group`` and ``ffn_mult`` / ``intermediate_size`` as in the config), as this project writes
them. Imports only torch and transformers.
"""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM

from .pruned_modeling import prune_sublayers


class _Fields(dict):
    """A JSON-ready mapping whose keys also read as attributes (``block.attention.no_op``), as vLLM reads them."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def block_config(entry) -> _Fields:
    """One ``block_configs`` entry with attribute access on it and on its ``attention`` / ``ffn`` parts."""
    entry = dict(entry)
    return _Fields({key: _Fields(value) if isinstance(value, dict) else value for key, value in entry.items()})


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"
    block_configs: list | None = None

    def __post_init__(self, **kwargs):
        self.block_configs = [block_config(entry) for entry in self.block_configs or []]
        super().__post_init__(**kwargs)
        self.check_uniform()

    def check_uniform(self) -> None:
        """Kept sublayers must have the config's widths: this class builds every layer alike."""
        groups = self.num_attention_heads // (self.num_key_value_heads or self.num_attention_heads)
        for index, block in enumerate(self.block_configs):
            attention, ffn = block["attention"], block["ffn"]
            if not attention["no_op"] and attention.get("n_heads_in_group") not in (None, groups):
                raise ValueError(f"block_configs[{index}].attention.n_heads_in_group "
                                 f"{attention['n_heads_in_group']} differs from the config's {groups}")
            size = ffn.get("intermediate_size")
            if not ffn["no_op"] and size not in (None, self.intermediate_size):
                raise ValueError(f"block_configs[{index}].ffn.intermediate_size {size} differs from the "
                                 f"config's {self.intermediate_size}")

    def keep_mask(self) -> str:
        """The layers' kept sublayers as a keep-mask (``AM,A-,-M``)."""
        return ",".join(("-" if b["attention"]["no_op"] else "A") + ("-" if b["ffn"]["no_op"] else "M")
                        for b in self.block_configs)


class DeciLMForCausalLM(LlamaForCausalLM):
    config_class = DeciLMConfig

    def __init__(self, config: DeciLMConfig):
        super().__init__(config)
        if len(config.block_configs) != config.num_hidden_layers:
            raise ValueError(f"block_configs has {len(config.block_configs)} entries for "
                             f"{config.num_hidden_layers} layers")
        prune_sublayers(self, {
            "keep": config.keep_mask(), "layers": "model.layers", "attn": "self_attn", "ffn": ["mlp"],
            "attn_norms": ["input_layernorm"], "ffn_norms": ["post_attention_layernorm"],
        })
