"""Hostile model files: GGUF metadata of the wrong type, nested too deep or sized past the file, and pickled
weights end with one message naming the file, exit 2 and nothing written, from every command that reads a model.
No payload runs."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from search.study import main as study_main
from surgery.export import main as export_main
from surgery.gguf_source import GgufError, read_header
from tests.faults import MODEL, PWNED, model_copy, refused, study_config, write_yaml

TENSOR = (8, 16)


def gguf_file(path: Path, **metadata) -> Path:
    """A small llama GGUF file; ``metadata`` adds or replaces keys (``("string", "x")``-style (type, value))."""
    import gguf

    kinds = {"string": gguf.GGUFValueType.STRING, "uint32": gguf.GGUFValueType.UINT32,
             "int32": gguf.GGUFValueType.INT32, "float32": gguf.GGUFValueType.FLOAT32,
             "array": gguf.GGUFValueType.ARRAY}
    values = {"llama.block_count": ("uint32", 1), "llama.context_length": ("uint32", 64),
              "llama.embedding_length": ("uint32", TENSOR[1]), "llama.feed_forward_length": ("uint32", 32),
              "llama.attention.head_count": ("uint32", 2),
              "llama.attention.layer_norm_rms_epsilon": ("float32", 1e-5), **metadata}
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, (kind, value) in values.items():
        writer.add_key_value(key, value, kinds[kind])
    writer.add_tensor("token_embd.weight", np.ones(TENSOR, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def raw_gguf(path: Path, kv: bytes, count: int = 1) -> Path:
    """A GGUF file whose metadata is ``count`` raw key-value pairs (and no tensors)."""
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, count) + kv + bytes(64))
    return path


def _key(name: str) -> bytes:
    return struct.pack("<Q", len(name)) + name.encode()


def _nested(tmp_path: Path, depth: int) -> Path:
    """``depth`` arrays, each holding the next, the innermost one uint8."""
    kv = _key("deep") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * (depth - 1) + struct.pack("<IQ", 0, 1)
    return raw_gguf(tmp_path / "deep.gguf", kv + b"\x00")


HOSTILE = {  # name: (file maker, expected message part)
    "alignment is a string": (lambda p: gguf_file(p / "m.gguf", **{"general.alignment": ("string", "x")}),
                              "general.alignment is string, expected integer"),
    "alignment is zero": (lambda p: gguf_file(p / "m.gguf", **{"general.alignment": ("uint32", 0)}),
                          "general.alignment = 0 is not a power of two"),
    "alignment not a power of two": (lambda p: gguf_file(p / "m.gguf", **{"general.alignment": ("uint32", 48)}),
                                     "general.alignment = 48 is not a power of two"),
    "layers as text": (lambda p: gguf_file(p / "m.gguf", **{"llama.block_count": ("string", "two")}),
                       "llama.block_count is string, expected integer"),
    "negative heads": (lambda p: gguf_file(p / "m.gguf", **{"llama.attention.head_count": ("int32", -2)}),
                       "llama.attention.head_count = -2 is out of range"),
    "epsilon as text": (lambda p: gguf_file(p / "m.gguf", **{
        "llama.attention.layer_norm_rms_epsilon": ("string", "tiny")}), "layer_norm_rms_epsilon is string"),
    "a billion layers": (lambda p: gguf_file(p / "m.gguf", **{"llama.block_count": ("uint32", 10**9)}),
                         "llama.block_count = 1000000000 is out of range [0, 4096]"),
    "vocabulary not an array": (lambda p: gguf_file(p / "m.gguf", **{"tokenizer.ggml.tokens": ("string", "a b")}),
                                "tokenizer.ggml.tokens is string, expected an array of string"),
    "scores as strings": (lambda p: gguf_file(p / "m.gguf", **{"tokenizer.ggml.scores": ("array", ["a", "b"])}),
                          "tokenizer.ggml.scores is array of string, expected an array of number"),
    "arrays thousands deep": (lambda p: _nested(p, 5000), "nested more than 4 deep"),
    "arrays a few too deep": (lambda p: _nested(p, 6), "nested more than 4 deep"),
    "array longer than the file": (lambda p: raw_gguf(p / "long.gguf", _key("big") + struct.pack("<IIQ", 9, 8, 2**60)),
                                   "is truncated"),
    "more pairs than the file holds": (lambda p: raw_gguf(p / "pairs.gguf", _key("general.name") + struct.pack(
        "<IQ", 8, 1) + b"x", count=2**40), "is truncated"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_gguf_refused_with_one_message(tmp_path, capsys, case):
    make, expected = HOSTILE[case]
    (tmp_path / "files").mkdir()
    path = make(tmp_path / "files")
    with pytest.raises(GgufError, match="GGUF|truncated"):
        read_header(path)
    config = write_yaml(tmp_path / "c.yaml", study_config(tmp_path / "out", model={"name": str(path)}))
    refused(capsys, study_main, ["run", str(config), "--no-progress"], ["model.name", str(path), expected], tmp_path)
    refused(capsys, study_main, ["run", str(config), "--dry-run"], [str(path), expected], tmp_path)
    refused(capsys, export_main, ["--model", str(path), "--mask", "AM", "--out", str(tmp_path / "e")],
            [str(path), expected], tmp_path)


class _Payload:
    """Unpickling this runs ``open(PWNED, 'w')``."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def _pickled(name: str, honest: bool):
    def make(folder: Path, root: Path) -> None:
        (folder / "model.safetensors").unlink()
        data = {"w": torch.zeros(2)} if honest else {"w": _Payload(root / PWNED)}
        with open(folder / name, "wb") as handle:
            pickle.dump(data, handle)
    return make


PICKLES = {
    "pytorch_model.bin with a payload": _pickled("pytorch_model.bin", honest=False),
    "an honest pytorch_model.bin": _pickled("pytorch_model.bin", honest=True),
    "a shard of a sharded checkpoint": _pickled("pytorch_model-00001-of-00002.bin", honest=False),
    "a .pt file": _pickled("model.pt", honest=False),
}


@pytest.mark.parametrize("case", sorted(PICKLES))
def test_pickled_weights_refused_and_never_unpickled(tmp_path, capsys, case):
    model = model_copy(tmp_path)
    PICKLES[case](model, tmp_path)
    config = write_yaml(tmp_path / "c.yaml", study_config(tmp_path / "out", model={"name": str(model)}))
    expected = ["weights are pickles", "only safetensors weights are read"]
    refused(capsys, study_main, ["run", str(config), "--no-progress"], ["model.name", *expected], tmp_path)
    refused(capsys, study_main, ["bench", str(model), "--against", str(MODEL)], expected, tmp_path)
    refused(capsys, export_main, ["--model", str(model), "--mask", "AM,AM,AM,AM,--", "--out", str(tmp_path / "e")],
            expected, tmp_path)
    assert not (tmp_path / PWNED).exists() and not os.path.exists(PWNED)
