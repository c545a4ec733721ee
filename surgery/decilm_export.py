"""``--format decilm``: a pruned Llama-family model as a DeciLM (``nemotron-nas``) checkpoint.

``config.json`` names ``DeciLMForCausalLM`` and carries one ``block_configs`` entry per remaining layer:
``attention.no_op`` / ``ffn.no_op`` for removed sublayers (their weights and norms are not in the file), and for
kept ones the source widths as vLLM's ``DeciLMForCausalLM`` and llama.cpp's converter read them
(``n_heads_in_group``; ``intermediate_size``, and ``ffn_mult`` where DeciLM's rounding to a multiple of 256 gives
the FFN width back). Whole removed layers are left out. The
configuration and model classes are ``decilm_modeling.py`` (with ``pruned_modeling.py``), copied next to the
weights and named in ``auto_map``.

llama.cpp's converter gives an ``A-`` layer (``ffn_mult: null``) FFN length 0, and llama.cpp's ``deci`` graph
then drops that layer's attention output: for llama.cpp use ``--format gguf``, which handles such layers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from . import decilm_modeling, pruned_modeling
from .export_target import ExportError
from .families import family_for
from .mask import KeepMask

MODULE_FILE = "modeling_decilm.py"
_DROP = ("depth_pruning", "auto_map", "architectures", "model_type", "base_model_type", "layer_types",
         "transformers_version", "kv_sharing_modes")


def ffn_mult(intermediate: int, hidden: int) -> float | None:
    """The ``ffn_mult`` that DeciLM's rule ``round_up(int(2 * ffn_mult * hidden / 3), 256)`` maps back to
    ``intermediate``; None when no value does (``intermediate`` not a multiple of 256)."""
    if intermediate % 256:
        return None
    mult = round(1.5 * intermediate / hidden, 6)
    while int(2 * mult * hidden / 3) < intermediate:  # float rounding must not fall one short
        mult = round(mult + 1e-6, 6)
    return mult


def block_configs(mask: KeepMask, config) -> list[dict]:
    """One entry per remaining layer of ``mask``."""
    groups = config.num_attention_heads // (getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    mult = ffn_mult(config.intermediate_size, config.hidden_size)
    out = []
    for attn, ffn in mask.layer_items():
        if not (attn or ffn):
            continue
        block = {"no_op": not ffn, "replace_with_linear": False,
                 "intermediate_size": config.intermediate_size if ffn else None}
        if mult is not None or not ffn:  # vLLM reads ffn_mult whenever the key is there
            block["ffn_mult"] = mult if ffn else None
        out.append({"attention": {"no_op": not attn, "replace_with_linear": False,
                                  "n_heads_in_group": groups if attn else None}, "ffn": block})
    return out


def decilm_config(mask: KeepMask, config) -> dict:
    """``config.json`` of the export, from the dense model's config."""
    values = {k: v for k, v in config.to_dict().items() if k not in _DROP}
    blocks = block_configs(mask, config)
    values.update(
        architectures=["DeciLMForCausalLM"], model_type=decilm_modeling.DeciLMConfig.model_type,
        num_hidden_layers=len(blocks), block_configs=blocks,
        auto_map={"AutoConfig": f"{MODULE_FILE[:-3]}.DeciLMConfig",
                  "AutoModelForCausalLM": f"{MODULE_FILE[:-3]}.DeciLMForCausalLM"},
    )
    if "rope_parameters" in values and "rope_theta" not in values:  # readers of transformers 4 configs
        values["rope_theta"] = (values["rope_parameters"] or {}).get("rope_theta", 10000.0)
    return values


def write_decilm(pruned, tokenizer, mask: KeepMask, directory: Path) -> None:
    """Write the checkpoint of ``pruned`` (``prune_model``'s result for ``mask``) into ``directory``."""
    from safetensors.torch import save_file

    family = family_for(pruned.config).name
    if family != "llama":
        raise ExportError(f"--format decilm: the model is a {family!r} model; DeciLM checkpoints hold "
                          "llama-family models (use --format hf)")
    source_config = pruned.config
    config = decilm_config(mask, source_config)
    state = {k: v.detach().contiguous() for k, v in pruned.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    shutil.copyfile(Path(decilm_modeling.__file__), directory / MODULE_FILE)
    shutil.copyfile(Path(pruned_modeling.__file__), directory / "pruned_modeling.py")
    generation = getattr(pruned, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
