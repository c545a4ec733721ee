"""A transformers Llama-family model, pruned by a mask, written as GGUF: weights, hyperparameters and tokenizer.

Weights go out as f16, bf16 or q8_0 (norms and biases in f32; a matrix whose rows q8_0 cannot block goes out as
f16), quantized by the ``gguf`` package. Q and K are permuted from transformers' half-split rotary layout to
llama.cpp's interleaved one. The tokenizer is a SentencePiece model (``tokenizer.model``) or a byte-fallback BPE
``tokenizer.json`` (Llama 1/2, Mistral, TinyLlama style), with its special tokens and chat template.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import torch

from .gguf_export import (FILE_NAME, GgufExportError, Shape, add_shape, add_stand_ins, architecture, blocks,
                          check_family, copy_from_gguf, write_file)
from .mask import KeepMask

OUTTYPES = ("f16", "bf16", "q8_0")
_ATTN = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "input_layernorm": "attn_norm"}
_FFN = {"mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
        "post_attention_layernorm": "ffn_norm"}


def _qtype(outtype: str):
    from gguf import GGMLQuantizationType as Q

    if outtype not in OUTTYPES:
        raise GgufExportError(f"--outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    return {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[outtype]


def _file_type(outtype: str) -> int:
    from gguf import LlamaFileType as F

    return {"f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}[outtype]


def permute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a Q or K projection from the half-split rotary layout to the interleaved one, per head."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _shape(config) -> Shape:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Shape(heads, getattr(config, "num_key_value_heads", None) or heads, config.intermediate_size, head_dim)


def _tensors(model, mask: KeepMask, shape: Shape):
    """(GGUF name, float tensor) of every kept weight, in output block order."""
    state = model.state_dict()
    yield "token_embd.weight", state["model.embed_tokens.weight"]
    for index, block in enumerate(blocks(mask)):
        names = {**(_ATTN if block.attn else {}), **(_FFN if block.ffn else {})}
        for hf, gguf_name in names.items():
            for kind in ("weight", "bias"):
                tensor = state.get(f"model.layers.{block.source}.{hf}.{kind}")
                if tensor is None:
                    continue
                if hf == "self_attn.q_proj":
                    tensor = permute_rotary(tensor, shape.heads)
                elif hf == "self_attn.k_proj":
                    tensor = permute_rotary(tensor, shape.kv_heads)
                yield f"blk.{index}.{gguf_name}.{kind}", tensor
    yield "output_norm.weight", state["model.norm.weight"]
    if not getattr(model.config, "tie_word_embeddings", False):
        yield "output.weight", state["lm_head.weight"]


def _encoded(tensor: torch.Tensor, qtype):
    """(array, raw type): 1-D tensors in f32; matrices in ``qtype`` when their rows fit its blocks, else f16."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, quants

    data = tensor.detach().to(torch.float32).cpu().numpy()
    if data.ndim == 1:
        return data, Q.F32
    kind = qtype if data.shape[-1] % GGML_QUANT_SIZES[qtype][0] == 0 else Q.F16
    return quants.quantize(data, kind), kind


def _rope(writer, config, shape: Shape) -> None:
    """Rotary base and scaling: plain, or Llama 3's frequency factors (as the ``rope_freqs`` tensor)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    writer.add_rope_freq_base(float(theta))
    writer.add_rope_dimension_count(shape.head_dim)
    kind = params.get("rope_type", "default")
    if kind == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(params, float(theta), shape.head_dim))
    elif kind != "default":
        raise GgufExportError(f"--format gguf: rope_type {kind!r} is not supported (default and llama3 are)")


def llama3_rope_factors(params: dict, theta: float, dim: int) -> np.ndarray:
    """Llama 3.1's per-frequency rotary scaling, one factor per frequency pair."""
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    context = params.get("original_max_position_embeddings", 8192)
    factors = []
    for i in range(0, dim, 2):
        wavelength = 2 * math.pi * theta ** (i / dim)
        if wavelength < context / high:
            factors.append(1.0)
        elif wavelength > context / low:
            factors.append(factor)
        else:
            smooth = (context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def write_from_model(model, tokenizer, mask: KeepMask, path: Path, outtype: str, *,
                     tokenizer_file: Path | None = None) -> str:
    """Write ``path`` from the dense transformers ``model`` and ``tokenizer``, pruned by ``mask``; with
    ``tokenizer_file`` (the ``.gguf`` file the model was read from) the tokenizer metadata is copied from there."""
    from gguf import GGUFWriter

    config = model.config
    qtype = _qtype(outtype)
    if tokenizer is None and tokenizer_file is None:
        raise GgufExportError("--format gguf needs the model's tokenizer (none was found with the model)")
    arch, out, shape = architecture(mask), blocks(mask), _shape(config)
    writer = GGUFWriter(path, arch, use_temp_file=False)
    writer.add_name(Path(str(getattr(config, "name_or_path", "") or "model")).name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    add_shape(writer, arch, shape, out)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type(_file_type(outtype))
    _rope(writer, config, shape)
    if tokenizer_file is not None:
        copy_tokenizer(writer, tokenizer_file)
    else:
        add_tokenizer(writer, tokenizer, int(config.vocab_size))
    for name, tensor in _tensors(model, mask, shape):
        array, kind = _encoded(tensor, qtype)
        writer.add_tensor(name, array, raw_shape=array.shape, raw_dtype=kind)
    add_stand_ins(writer, arch, out, int(config.hidden_size), shape.head_dim)
    write_file(writer, path)
    return arch


# tokenizer ------------------------------------------------------------------------------------------------------
def copy_tokenizer(writer, source: Path) -> None:
    """Every ``tokenizer.*`` field of the GGUF file ``source``, as it is there (vocabulary, merges, special
    tokens, chat template)."""
    from gguf import GGUFReader, GGUFValueType

    for key, field in GGUFReader(source).fields.items():
        if key.startswith("tokenizer."):
            kind = field.types[0]
            writer.add_key_value(key, field.contents(), kind, field.types[-1] if kind == GGUFValueType.ARRAY else None)


def _vocab(directory: Path):
    from gguf.vocab import LlamaHfVocab, SentencePieceVocab

    if (directory / "tokenizer.model").is_file():
        return SentencePieceVocab(directory)
    try:
        return LlamaHfVocab(directory)
    except (FileNotFoundError, TypeError, KeyError):
        raise GgufExportError(
            "--format gguf: the model's tokenizer is neither SentencePiece nor a byte-fallback BPE tokenizer; "
            "llama.cpp needs its pre-tokenizer named for it. Export from the model's .gguf file instead, or "
            "export --format decilm and convert that with llama.cpp's convert_hf_to_gguf.py") from None


def add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """Tokens, scores, types, special token ids and chat template, read as llama.cpp's converter reads them."""
    from gguf import SpecialVocab

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        tokenizer.save_pretrained(directory)
        source = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
        if not (directory / "tokenizer.model").is_file() and (source / "tokenizer.model").is_file():
            (directory / "tokenizer.model").write_bytes((source / "tokenizer.model").read_bytes())
        vocab = _vocab(directory)
        tokens, scores, types = [], [], []
        for text, score, kind in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(int(kind))
        for extra in range(len(tokens), vocab_size):  # rows the embedding has beyond the tokenizer
            tokens.append(f"[PAD{extra}]".encode())
            scores.append(-1000.0)
            types.append(5)  # gguf.TokenType.UNUSED
        writer.add_tokenizer_model(vocab.tokenizer_model)
        writer.add_token_list(tokens[:vocab_size])
        writer.add_token_scores(scores[:vocab_size])
        writer.add_token_types(types[:vocab_size])
        special = SpecialVocab(directory, load_merges=False, n_vocab=vocab_size)
        if special.chat_template is None and getattr(tokenizer, "chat_template", None):
            special.chat_template = tokenizer.chat_template
        special.add_to_gguf(writer)


# the writer behind ``export_pruned(..., format="gguf")`` ----------------------------------------------------------
def write_gguf(model, tokenizer, mask: KeepMask, staging: Path, *, source_file: Path | None = None,
               outtype: str | None = None) -> str:
    """Write ``staging/model.gguf`` for the dense ``model`` pruned by ``mask``; returns the architecture.

    ``source_file``: the ``.gguf`` file the model was loaded from; without ``outtype`` its tensors are copied as
    they are, with ``outtype`` the (dequantized) model's weights are written in that type and the file's tokenizer
    metadata copied. Otherwise ``model``'s weights are converted to ``outtype`` (default f16)."""
    check_family(model.config, str(source_file or getattr(model.config, "name_or_path", "") or "the model"))
    if source_file is not None and outtype is None:
        return copy_from_gguf(Path(source_file), mask, staging / FILE_NAME)
    return write_from_model(model, tokenizer, mask, staging / FILE_NAME, outtype or "f16",
                            tokenizer_file=Path(source_file) if source_file else None)
