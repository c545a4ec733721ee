"""``--format gguf``: a pruned Llama-family model as one GGUF file that llama.cpp (and Ollama, LM Studio) runs.

A mask that removes only whole layers is written as llama.cpp's ``llama`` architecture with fewer blocks; any
other mask as its ``deci`` architecture, whose per-layer arrays give each block's head count (0: no attention)
and FFN length (0: no FFN). From a ``.gguf`` source the kept tensors are copied byte for byte in their original
quantization, with the file's tokenizer and chat template; from a transformers model the weights are written as
f16, bf16 or q8_0 (``gguf``'s numpy quantizers) with the model's tokenizer (``surgery.gguf_model``).

A trap in llama.cpp's ``deci`` graph: a block with attention and FFN length 0 skips the attention's residual add
(its ``n_ff == 0`` early exit comes before it). A kept attention whose FFN is removed (``A-``) therefore gets an
FFN of ``ZERO_FFN_WIDTH`` channels whose weights are all zero: it adds exactly nothing, and the attention's
output reaches the residual stream as in the masked model. And llama.cpp takes the head size and the rotary width
from block 0's head count (0 heads there reads as a model without attention, and loading fails): when block 0 has
no attention it gets one head whose weights are all zero, which adds exactly nothing either.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .export_target import ExportError
from .families import family_for
from .mask import KeepMask

FILE_NAME = "model.gguf"
GGUF_FAMILIES = ("llama",)  # families whose tensors and graph llama.cpp's llama / deci architectures run
ZERO_FFN_WIDTH = 32  # channels of the all-zero FFN of an ``A-`` block (one Q8_0 / F16 block row)
ZERO_ATTENTION_HEADS = 1  # heads of the all-zero attention of block 0 when the mask removes its attention
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


class GgufExportError(ExportError):
    """A model, source file or option that ``--format gguf`` cannot write."""


@dataclass(frozen=True)
class Block:
    """One block of the output: the source layer it comes from and which of its sublayers it keeps."""

    source: int
    attn: bool
    ffn: bool


def blocks(mask: KeepMask) -> list[Block]:
    """The output blocks of ``mask``: every layer that keeps a sublayer, in order."""
    return [Block(i, a, m) for i, (a, m) in enumerate(mask.layer_items()) if a or m]


def architecture(mask: KeepMask) -> str:
    """``llama`` when only whole layers go, ``deci`` when some layer keeps one sublayer of two."""
    return "llama" if mask.whole_layers_only else "deci"


@dataclass(frozen=True)
class Shape:
    """The dense model's per-block widths, and the per-block arrays of the output."""

    heads: int
    kv_heads: int
    ffn: int
    head_dim: int

    def arrays(self, out: list[Block]) -> dict[str, list[int]]:
        """Per output block: head count, KV head count, FFN length (``A-`` blocks: the zero FFN's width; block 0
        without attention: the zero attention's heads)."""
        heads = [self.heads if b.attn else 0 for b in out]
        kv_heads = [self.kv_heads if b.attn else 0 for b in out]
        if not out[0].attn:
            heads[0] = kv_heads[0] = ZERO_ATTENTION_HEADS
        return {"head_count": heads, "head_count_kv": kv_heads,
                "feed_forward_length": [self.ffn if b.ffn else ZERO_FFN_WIDTH for b in out]}


def check_family(config, what: str) -> None:
    """Refuse a family llama.cpp has no mapping for here, in one message."""
    family = family_for(config).name
    if family not in GGUF_FAMILIES:
        raise GgufExportError(f"--format gguf: {what} is a {family!r} model; GGUF export supports the "
                              f"{', '.join(GGUF_FAMILIES)} family (use --format hf or decilm)")


def kept_tensor(name: str, out_index: dict[int, int], mask: KeepMask) -> str | None:
    """The output name of a source GGUF tensor, or None when the mask removes it (``blk.N.attn_*`` goes with
    attention N, ``blk.N.ffn_*`` with FFN N, every ``blk.N.*`` with a removed layer N)."""
    match = _BLOCK.fullmatch(name)
    if not match:
        return name
    layer, rest = int(match.group(1)), match.group(2)
    if layer not in out_index:
        return None
    if rest.startswith("attn_") and not mask.keeps(layer, 0) or rest.startswith("ffn_") and not mask.keeps(layer, 1):
        return None
    return f"blk.{out_index[layer]}.{rest}"


def zero_ffn(index: int, hidden: int) -> dict[str, np.ndarray]:
    """The all-zero FFN of ``A-`` output block ``index`` (numpy shapes: rows = output channels)."""
    width = ZERO_FFN_WIDTH
    return {
        f"blk.{index}.ffn_norm.weight": np.ones(hidden, dtype=np.float32),
        f"blk.{index}.ffn_gate.weight": np.zeros((width, hidden), dtype=np.float16),
        f"blk.{index}.ffn_up.weight": np.zeros((width, hidden), dtype=np.float16),
        f"blk.{index}.ffn_down.weight": np.zeros((hidden, width), dtype=np.float16),
    }


def zero_attention(hidden: int, head_dim: int) -> dict[str, np.ndarray]:
    """The all-zero attention of output block 0 when the mask removes that block's attention."""
    width = ZERO_ATTENTION_HEADS * head_dim
    return {
        "blk.0.attn_norm.weight": np.ones(hidden, dtype=np.float32),
        "blk.0.attn_q.weight": np.zeros((width, hidden), dtype=np.float16),
        "blk.0.attn_k.weight": np.zeros((width, hidden), dtype=np.float16),
        "blk.0.attn_v.weight": np.zeros((width, hidden), dtype=np.float16),
        "blk.0.attn_output.weight": np.zeros((hidden, width), dtype=np.float16),
    }


def add_shape(writer, arch: str, shape: Shape, out: list[Block]) -> None:
    """Block count and widths: scalars for ``llama``, per-block arrays for ``deci`` (with the head size given
    outright: llama.cpp would otherwise divide by block 0's head count, which may be 0)."""
    writer.add_block_count(len(out))
    if arch == "llama":
        writer.add_head_count(shape.heads)
        writer.add_head_count_kv(shape.kv_heads)
        writer.add_feed_forward_length(shape.ffn)
        return
    arrays = shape.arrays(out)
    writer.add_head_count(arrays["head_count"])
    writer.add_head_count_kv(arrays["head_count_kv"])
    writer.add_feed_forward_length(arrays["feed_forward_length"])
    writer.add_key_length(shape.head_dim)
    writer.add_value_length(shape.head_dim)


def write_file(writer, path: Path) -> None:
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# from a .gguf source: kept tensors copied as they are ------------------------------------------------------------
_SHAPE_KEYS = ("block_count", "head_count", "head_count_kv", "feed_forward_length", "key_length", "value_length")


def _field_value(field):
    from gguf import GGUFValueType

    kind = field.types[0]
    return field.contents(), kind, (field.types[-1] if kind == GGUFValueType.ARRAY else None)


def _source_shape(reader, arch: str, path: Path) -> Shape:
    def scalar(key: str, default=None):
        field = reader.get_field(f"{arch}.{key}")
        if field is None:
            if default is None:
                raise GgufExportError(f"{path}: no {arch}.{key} in its metadata")
            return default
        value = field.contents()
        if isinstance(value, list):
            raise GgufExportError(f"{path}: {arch}.{key} is per-layer; only uniform source models can be pruned")
        return int(value)

    heads = scalar("attention.head_count")
    head_dim = scalar("attention.key_length", scalar("embedding_length") // heads)
    return Shape(heads, scalar("attention.head_count_kv", heads), scalar("feed_forward_length"), head_dim)


def _llama_reader(source: Path):
    """A GGUFReader of ``source``, refused unless its architecture is llama.cpp's ``llama``."""
    from gguf import GGUFReader

    from .gguf_source import read_header

    read_header(source)  # a missing, truncated or foreign file: one message naming it
    reader = GGUFReader(source)
    arch = str(reader.get_field("general.architecture").contents())
    if arch != "llama":
        raise GgufExportError(f"--format gguf: {source} has architecture {arch!r}; its tensors can be "
                              "copied only from a 'llama' GGUF file")
    return reader


def parameter_counts(source: Path, mask: KeepMask | str) -> tuple[dict[str, int], int]:
    """({dense_params, pruned_params}, layers) of ``source`` pruned by ``mask``, from its tensor sizes."""
    reader = _llama_reader(source)
    layers = int(reader.get_field("llama.block_count").contents())
    mask = KeepMask.parse(mask, layers) if isinstance(mask, str) else mask
    mask.check_layers(layers)
    out_index = {b.source: i for i, b in enumerate(blocks(mask))}
    sizes = [(t.name, int(np.prod([int(x) for x in t.shape]))) for t in reader.tensors]
    dense = sum(size for _, size in sizes)
    pruned = sum(size for name, size in sizes if kept_tensor(name, out_index, mask) is not None)
    return {"dense_params": dense, "pruned_params": pruned}, layers


def copy_from_gguf(source: Path, mask: KeepMask, path: Path) -> str:
    """Write the pruned model from the ``.gguf`` file ``source``: metadata and kept tensors as they are there."""
    from gguf import GGUFWriter

    reader = _llama_reader(source)
    src_arch = "llama"
    count = int(reader.get_field(f"{src_arch}.block_count").contents())
    mask.check_layers(count)
    arch, out = architecture(mask), blocks(mask)
    shape = _source_shape(reader, src_arch, source)
    writer = GGUFWriter(path, arch, use_temp_file=False)
    skip = {f"{src_arch}.{key}" for key in _SHAPE_KEYS} | {f"{src_arch}.attention.{key}" for key in _SHAPE_KEYS}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.alignment") or key in skip:
            continue
        value, kind, sub = _field_value(field)
        writer.add_key_value(arch + key[len(src_arch):] if key.startswith(src_arch + ".") else key, value, kind, sub)
    add_shape(writer, arch, shape, out)
    out_index = {b.source: i for i, b in enumerate(out)}
    for tensor in reader.tensors:
        name = kept_tensor(tensor.name, out_index, mask)
        if name is not None:
            writer.add_tensor(name, tensor.data, raw_shape=tensor.data.shape, raw_dtype=tensor.tensor_type)
    hidden = int(reader.get_field(f"{src_arch}.embedding_length").contents())
    add_stand_ins(writer, arch, out, hidden, shape.head_dim)
    write_file(writer, path)
    return arch


def add_stand_ins(writer, arch: str, out: list[Block], hidden: int, head_dim: int) -> None:
    """The all-zero FFNs of ``A-`` blocks and the all-zero attention of an attention-free block 0 (``deci``)."""
    if arch != "deci":
        return
    tensors = zero_attention(hidden, head_dim) if not out[0].attn else {}
    for index, block in enumerate(out):
        if block.attn and not block.ffn:
            tensors.update(zero_ffn(index, hidden))
    for name, array in tensors.items():
        writer.add_tensor(name, array)
