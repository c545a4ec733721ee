""".gguf model files: a bad file (missing, not GGUF, truncated, corrupt, unreadable or unsupported architecture,
no ``gguf`` package) gets one message naming it, from the loader, the study config check and the export CLI."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from search.config import ConfigError, check_config, load_config, model_source
from surgery.export import main as export_main
from surgery.gguf_source import GgufError, read_header
from surgery.load import load_model, load_model_config, looks_local

ROOT = Path(__file__).resolve().parents[2]
TENSOR = (8, 16)  # one float32 tensor: 512 bytes of data


def write_gguf(path: Path, arch: str) -> Path:
    """A small, well-formed GGUF file of ``arch``: config keys and one embedding tensor (no tokenizer)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(2)
    writer.add_context_length(64)
    writer.add_embedding_length(TENSOR[1])
    writer.add_feed_forward_length(32)
    writer.add_head_count(2)
    writer.add_layer_norm_eps(1e-5)
    writer.add_tensor("token_embd.weight", np.arange(np.prod(TENSOR), dtype=np.float32).reshape(TENSOR))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def llama_gguf(tmp_path) -> Path:
    return write_gguf(tmp_path / "tiny-llama.gguf", "llama")


def _cut(source: Path, size: int, name: str) -> Path:
    target = source.with_name(name)
    target.write_bytes(source.read_bytes()[:size])
    return target


def test_header_of_a_whole_file_fits_it_exactly(llama_gguf):
    header = read_header(llama_gguf)
    assert (header.architecture, header.tensors) == ("llama", 1)
    assert header.data_end == header.size == llama_gguf.stat().st_size


def test_missing_file(tmp_path):
    with pytest.raises(GgufError, match=r"model file .*absent\.gguf does not exist"):
        load_model(str(tmp_path / "absent.gguf"))


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "weights.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(200))
    with pytest.raises(GgufError, match=r"weights\.gguf is not a GGUF file"):
        load_model(str(path))


def test_truncated_tensor_data(llama_gguf):
    size = llama_gguf.stat().st_size
    cut = _cut(llama_gguf, size - 100, "cut-data.gguf")
    with pytest.raises(GgufError) as error:
        load_model(str(cut))
    assert str(error.value) == (f"{cut} is truncated: its 1 tensors need {size:,} bytes, the file has {size - 100:,}")


def test_truncated_header(llama_gguf):
    cut = _cut(llama_gguf, 60, "cut-header.gguf")
    with pytest.raises(GgufError, match=r"cut-header\.gguf is truncated: its header runs past the end of the file \(60 bytes\)"):
        load_model_config(str(cut))


def test_corrupt_header(tmp_path):
    path = tmp_path / "corrupt.gguf"
    key = b"\xff\xfe"  # not UTF-8
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key + bytes(64))
    with pytest.raises(GgufError, match=r"corrupt\.gguf is a corrupt GGUF file"):
        load_model(str(path))


def test_architecture_transformers_cannot_read(tmp_path):
    path = write_gguf(tmp_path / "encoder.gguf", "bert")
    with pytest.raises(GgufError) as error:
        load_model(str(path))
    message = str(error.value)
    assert message.startswith(f"cannot read a model config from the GGUF file {path} (architecture 'bert'): ")
    assert "bert is not supported" in message


def test_family_outside_the_table(tmp_path):
    path = write_gguf(tmp_path / "bloom.gguf", "bloom")  # transformers reads it; no family row for it
    with pytest.raises(GgufError, match=r"bloom\.gguf: unsupported model architecture 'bloom'; supported families: "):
        load_model(str(path))


def test_gguf_package_missing(llama_gguf, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError, as without the package
    with pytest.raises(GgufError) as error:
        load_model(str(llama_gguf))
    assert str(error.value) == f"reading the GGUF file {llama_gguf} needs the `gguf` package: pip install 'gguf>=0.17,<1'"


def test_a_gguf_name_is_a_local_path(tmp_path):
    assert looks_local("models/x.gguf") and not looks_local("org/model")
    data = yaml.safe_load((ROOT / "studies" / "stories260k.yaml").read_text(encoding="utf-8"))
    data["model"]["name"] = "models/x.gguf"  # one slash: a hub id if it were not a .gguf file
    config_file = tmp_path / "c.yaml"
    config_file.write_text(yaml.safe_dump(data), encoding="utf-8")
    config = load_config(config_file)
    assert model_source(config) == ("models/x.gguf", True)
    with pytest.raises(ConfigError, match=r"model\.name: model file models/x\.gguf does not exist"):
        check_config(config)


def test_study_config_check_names_a_truncated_gguf(tmp_path, llama_gguf):
    cut = _cut(llama_gguf, 60, "cut.gguf")
    data = yaml.safe_load((ROOT / "studies" / "stories260k.yaml").read_text(encoding="utf-8"))
    data["model"]["name"] = str(cut)
    config_file = tmp_path / "c.yaml"
    config_file.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"model\.name: .*cut\.gguf is truncated"):
        check_config(load_config(config_file))


def test_export_cli_exit_2_on_a_bad_gguf(tmp_path, llama_gguf, capsys):
    cut = _cut(llama_gguf, llama_gguf.stat().st_size - 1, "short.gguf")
    out = tmp_path / "out"
    assert export_main(["--model", str(cut), "--mask", "AM,AM", "--out", str(out)]) == 2
    assert f"error: {cut} is truncated" in capsys.readouterr().err
    assert not out.exists()
