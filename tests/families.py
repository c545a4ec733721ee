"""Tiny seeded models, one per supported family: every surgery test runs over ``CASES``.

A new family is one row in ``surgery/families.py`` plus one ``Case`` here. ``ffn_branch`` is the family's FFN
residual branch written out by hand (norms and modules, in call order) and ``attn_post`` what the layer does to
the attention module's output before adding it, so tests can check masked layers against plain arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import transformers as tf

VOCAB = 96
SEQ = 12


def _identity(layer, out):
    return out


@dataclass(frozen=True)
class Case:
    name: str  # the family name in surgery.families.FAMILIES
    config: Callable[[], Any]
    ffn_branch: Callable[[Any, torch.Tensor], torch.Tensor]  # (layer, residual input) -> what the FFN adds
    attn_post: Callable[[Any, torch.Tensor], torch.Tensor] = _identity  # (layer, attention output) -> what it adds
    extra: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return self.name


_SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2)


def _pre_norm_ffn(layer, h):
    return layer.mlp(layer.post_attention_layernorm(h))


CASES: list[Case] = [
    Case("llama", lambda: tf.LlamaConfig(**_SMALL), _pre_norm_ffn),
    Case("mistral", lambda: tf.MistralConfig(**_SMALL, sliding_window=8), _pre_norm_ffn),
    Case("qwen2", lambda: tf.Qwen2Config(**_SMALL), _pre_norm_ffn),
    Case("qwen3", lambda: tf.Qwen3Config(**_SMALL, head_dim=8), _pre_norm_ffn),
    Case("phi3", lambda: tf.Phi3Config(**_SMALL, pad_token_id=0), _pre_norm_ffn),
    Case("mixtral", lambda: tf.MixtralConfig(**_SMALL, num_local_experts=4, num_experts_per_tok=2), _pre_norm_ffn),
    Case(
        "gemma2",
        lambda: tf.Gemma2Config(**_SMALL, head_dim=8, query_pre_attn_scalar=8, sliding_window=8),
        lambda layer, h: layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h))),
        lambda layer, out: layer.post_attention_layernorm(out),
    ),
    Case(
        "gpt_neox",  # parallel residual: h + attn(ln1(h)) + mlp(ln2(h))
        lambda: tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                 num_attention_heads=4, max_position_embeddings=64, use_parallel_residual=True,
                                 bos_token_id=1, eos_token_id=2),
        lambda layer, h: layer.mlp(layer.post_attention_layernorm(h)),
    ),
    Case(
        "gpt2",
        lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                               bos_token_id=1, eos_token_id=2),
        lambda layer, h: layer.mlp(layer.ln_2(h)),
    ),
    Case(
        "opt",
        lambda: tf.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=3, num_attention_heads=4,
                             max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=0,
                             bos_token_id=1, eos_token_id=2),
        lambda layer, h: layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(h)))),
    ),
]

BY_NAME = {case.name: case for case in CASES}


def tiny_model(case: Case | str, *, seed: int = 0):
    """A seeded tiny CausalLM of the family in eval mode; weights scaled up so every sublayer matters."""
    case = BY_NAME[case] if isinstance(case, str) else case
    config = case.config()
    config.initializer_range = 0.2
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms start at 1 (or 0 for Gemma); jitter them so norm weights count
        for name, p in model.named_parameters():
            if "norm" in name or ".ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def input_ids(*, batch: int = 2, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
