"""A ``.gguf`` file (as llama.cpp users have them) as a model source.

The file is checked first (exists, ``gguf`` installed, GGUF magic, header complete, tensor data within the
file), then its config (an architecture transformers reads, a family in the table), so a bad file gets one
message naming it; then transformers' GGUF support loads it dequantized in the requested dtype. The loaded model carries no quantization state: it masks, trains
and saves (safetensors) like any other model.
"""

from __future__ import annotations

import copy
import functools
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

GGUF_REQUIREMENT = "gguf>=0.17,<1"
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_VERSIONS = (2, 3)
MAX_DEPTH = 4  # arrays of arrays nested deeper than this are refused (llama.cpp writes at most 2)
MAX_DIMS = 4  # GGML_MAX_DIMS
INTEGER, NUMBER, TEXT = "integer", "number", "string"
_KINDS = {INTEGER: {0, 1, 2, 3, 4, 5, 10, 11}, NUMBER: {0, 1, 2, 3, 4, 5, 6, 10, 11, 12}, TEXT: {_STRING}}
# the type of each metadata value transformers reads: "<arch>." keys by their suffix, then whole keys; "[]": an
# array of that type
ARCH_KEYS = {
    **dict.fromkeys(("block_count", "context_length", "embedding_length", "feed_forward_length",
                     "attention.head_count", "attention.head_count_kv", "attention.key_length",
                     "attention.value_length", "rope.dimension_count", "vocab_size", "expert_count",
                     "expert_used_count", "attention.sliding_window"), INTEGER),
    **dict.fromkeys(("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon", "rope.freq_base",
                     "rope.scaling.factor", "logit_scale"), NUMBER),
}
KEYS = {
    "general.alignment": INTEGER, "general.architecture": TEXT, "general.name": TEXT, "tokenizer.ggml.model": TEXT,
    "tokenizer.ggml.pre": TEXT, "tokenizer.ggml.tokens": TEXT + "[]", "tokenizer.ggml.merges": TEXT + "[]",
    "tokenizer.ggml.scores": NUMBER + "[]", "tokenizer.ggml.token_type": INTEGER + "[]",
    **{f"tokenizer.ggml.{name}_token_id": INTEGER for name in ("bos", "eos", "unknown", "padding", "separator")},
}
SIZE_MAX = 1 << 31  # the largest integer hyperparameter (widths, heads, positions) read from a file
LAYERS_MAX = 4096  # the most decoder layers (the largest models have a few hundred)


class GgufError(UserError):
    """A ``.gguf`` model file that is missing, unreadable, truncated or of an unsupported architecture."""


class _Cut(Exception):
    """The header runs past the end of the file."""


def is_gguf(name: str | Path) -> bool:
    return str(name).lower().endswith(".gguf")


@dataclass(frozen=True)
class GgufHeader:
    path: Path
    architecture: str
    tensors: int
    data_end: int  # bytes the tensor data needs (end of the last tensor)
    size: int  # bytes in the file


def _require_gguf_package(path: Path) -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise GgufError(f"reading the GGUF file {path} needs the `gguf` package: pip install '{GGUF_REQUIREMENT}'") from None
    from transformers.utils import is_gguf_available

    if not is_gguf_available():
        raise GgufError(f"reading the GGUF file {path} needs a newer `gguf` package: pip install '{GGUF_REQUIREMENT}'")


def _unpack(fmt: str, buf, pos: int) -> tuple[tuple, int]:
    size = struct.calcsize(fmt)
    if pos + size > len(buf):
        raise _Cut
    return struct.unpack_from(fmt, buf, pos), pos + size


def _string(buf, pos: int) -> tuple[str, int]:
    (length,), pos = _unpack("<Q", buf, pos)
    if pos + length > len(buf):
        raise _Cut
    return bytes(buf[pos : pos + length]).decode("utf-8"), pos + length


@dataclass(frozen=True)
class _Array:
    item: int  # the value type of its items
    count: int


_MIN_BYTES = {_STRING: 8, _ARRAY: 12}  # the smallest encoding of one string, one array


def _value(buf, pos: int, kind: int, depth: int = 0):
    """One metadata value (an array as :class:`_Array`, its items skipped) and the position after it."""
    if kind in _SCALAR:
        (value,), pos = _unpack(_SCALAR[kind], buf, pos)
        return value, pos
    if kind == _STRING:
        return _string(buf, pos)
    if kind != _ARRAY:
        raise ValueError(f"unknown metadata value type {kind}")
    if depth >= MAX_DEPTH:
        raise ValueError(f"metadata arrays nested more than {MAX_DEPTH} deep")
    (item, count), pos = _unpack("<IQ", buf, pos)
    size = struct.calcsize(_SCALAR[item]) if item in _SCALAR else _MIN_BYTES.get(item, 1)
    if pos + count * size > len(buf):
        raise _Cut
    if item in _SCALAR:
        return _Array(item, count), pos + count * size
    for _ in range(count):
        _, pos = _value(buf, pos, item, depth + 1)
    return _Array(item, count), pos


def _type_name(kind: int, value) -> str:
    if isinstance(value, _Array):
        return f"array of {_type_name(value.item, None)}"
    return {_STRING: "string", 7: "bool", 6: "float32", 12: "float64"}.get(kind, "integer")


def _check_metadata(metadata: dict) -> None:
    """Every value transformers reads has its type; sizes are in range; alignment is a power of two."""
    architecture = metadata.get("general.architecture", (None, ""))[1]
    architecture = architecture if isinstance(architecture, str) else ""
    for key, (kind, value) in metadata.items():
        suffix = key[len(architecture) + 1:] if architecture and key.startswith(f"{architecture}.") else None
        expected = ARCH_KEYS.get(suffix) or KEYS.get(key)
        if expected is None:
            continue
        array = expected.endswith("[]")
        kinds = _KINDS[expected.rstrip("[]")]
        if array != isinstance(value, _Array) or (value.item if array else kind) not in kinds:
            raise ValueError(f"metadata {key} is {_type_name(kind, value)}, expected {'an array of ' if array else ''}"
                             f"{expected.rstrip('[]')}")
        largest = LAYERS_MAX if suffix == "block_count" else SIZE_MAX
        if expected == INTEGER and not 0 <= value <= largest:
            raise ValueError(f"metadata {key} = {value} is out of range [0, {largest}]")
    alignment = metadata.get("general.alignment", (None, 32))[1]
    if alignment < 1 or alignment & (alignment - 1):
        raise ValueError(f"metadata general.alignment = {alignment} is not a power of two")


def _tensor_bytes(dims: tuple[int, ...], kind: int) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
    return math.prod(dims) // block * size


def _parse(buf, path: Path) -> GgufHeader:
    if bytes(buf[:4]) != b"GGUF":
        raise GgufError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    (version, tensor_count, kv_count), pos = _unpack("<IQQ", buf, 4)
    if version not in _VERSIONS:
        raise GgufError(f"{path} is GGUF version {version}; versions {_VERSIONS} can be read")
    if pos + kv_count * 13 + tensor_count * 24 > len(buf):  # a key-value pair takes >= 13 bytes, a tensor >= 24
        raise _Cut
    metadata = {}
    for _ in range(kv_count):
        key, pos = _string(buf, pos)
        (kind,), pos = _unpack("<I", buf, pos)
        value, pos = _value(buf, pos, kind)
        metadata[key] = (kind, value)
    _check_metadata(metadata)
    tensors = []
    for _ in range(tensor_count):
        name, pos = _string(buf, pos)
        (ndim,), pos = _unpack("<I", buf, pos)
        if ndim > MAX_DIMS:
            raise ValueError(f"tensor {name} has {ndim} dimensions (at most {MAX_DIMS})")
        dims, pos = _unpack(f"<{ndim}Q", buf, pos)
        (kind, offset), pos = _unpack("<IQ", buf, pos)
        tensors.append((dims, kind, offset))
    align = metadata.get("general.alignment", (None, 32))[1]
    start = -(-pos // align) * align
    data_end = max((start + offset + _tensor_bytes(dims, kind) for dims, kind, offset in tensors), default=pos)
    return GgufHeader(path, str(metadata.get("general.architecture", (None, ""))[1]), tensor_count, data_end,
                      len(buf))


def read_header(path: str | Path) -> GgufHeader:
    """The header of a GGUF file, checked: complete, with an architecture and tensor data that fits the file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise GgufError(f"model file {path} does not exist")
    if not path.is_file():
        raise GgufError(f"model file {path} is not a file")
    _require_gguf_package(path)
    if path.stat().st_size < 24:
        raise GgufError(f"{path} is not a GGUF file ({path.stat().st_size} bytes, shorter than a GGUF header)")
    try:
        with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            header = _parse(buf, path)
    except _Cut:
        raise GgufError(f"{path} is truncated: its header runs past the end of the file "
                        f"({path.stat().st_size:,} bytes)") from None
    except (ValueError, KeyError, UnicodeDecodeError, struct.error) as error:
        raise GgufError(f"{path} is a corrupt GGUF file: {error}") from None
    except OSError as error:
        raise GgufError(f"cannot read the model file {path}: {error}") from None
    if header.data_end > header.size:
        raise GgufError(f"{path} is truncated: its {header.tensors} tensors need {header.data_end:,} bytes, "
                        f"the file has {header.size:,}")
    if not header.architecture:
        raise GgufError(f"{path} is a corrupt GGUF file: no general.architecture in its metadata")
    return header


def _wrapped(header: GgufHeader, what: str, call):
    """``call()``, with transformers' errors on this file turned into one message naming it."""
    try:
        return call()
    except UserError:
        raise
    except (OSError, ValueError, KeyError, NotImplementedError, RuntimeError, ImportError, struct.error) as error:
        raise GgufError(f"cannot read {what} from the GGUF file {header.path} "
                        f"(architecture {header.architecture!r}): {error}") from None


# transformers parses a GGUF file's whole metadata (vocabulary and merges: seconds) for its config and again for
# its tokenizer; both are parsed once per process and file version, and callers get copies.
def _version(header: GgufHeader) -> tuple:
    stat = header.path.stat()
    return header, str(header.path.resolve()), stat.st_mtime_ns


@functools.lru_cache(maxsize=2)
def _parsed_config(header: GgufHeader, *_version):
    from transformers import AutoConfig

    from .families import UnsupportedModelError, family_for

    config = _wrapped(header, "a model config",
                      lambda: AutoConfig.from_pretrained(str(header.path.parent), gguf_file=header.path.name))
    try:
        family_for(config)
    except UnsupportedModelError as error:
        raise GgufError(f"{header.path}: {error}") from None
    return config


@functools.lru_cache(maxsize=2)
def _parsed_tokenizer(header: GgufHeader, *_version):
    from transformers import AutoTokenizer

    return _wrapped(header, "a tokenizer",
                    lambda: AutoTokenizer.from_pretrained(str(header.path.parent), gguf_file=header.path.name))


def gguf_config(path: str | Path):
    """The transformers config of a GGUF file (metadata only, no weights), its family checked."""
    config = copy.deepcopy(_parsed_config(*_version(read_header(path))))
    config.name_or_path = str(Path(path).expanduser())
    return config


def gguf_tokenizer(path: str | Path):
    return copy.deepcopy(_parsed_tokenizer(*_version(read_header(path))))


def gguf_model(path: str | Path, dtype):
    """The causal LM of a GGUF file, dequantized to ``dtype``; no quantization state is left on it."""
    from transformers import AutoModelForCausalLM

    header = read_header(path)
    config = gguf_config(path)
    options = {}
    try:
        from transformers import GgufConfig

        options["quantization_config"] = GgufConfig(dequantize=True)  # plain nn.Linear weights, never packed
    except ImportError:
        pass
    model = _wrapped(header, "the weights", lambda: AutoModelForCausalLM.from_pretrained(
        str(header.path.parent), gguf_file=header.path.name, config=config, dtype=dtype, **options))
    _drop_quantization(model)
    model.config.name_or_path = config.name_or_path
    return model


def _drop_quantization(model) -> None:
    """Forget the GGUF origin so ``save_pretrained`` writes plain safetensors (the weights are dequantized)."""
    for owner, name in ((model, "hf_quantizer"), (model, "quantization_method"), (model.config, "quantization_config")):
        if hasattr(owner, name):
            delattr(owner, name)
    model.is_quantized = False
