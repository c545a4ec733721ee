"""Atomic writes: a reader sees the old file or the finished new one, never a half-written one.

A file is written to a temporary name beside its destination and renamed onto it (``os.replace`` is atomic
within one file system); a failed write leaves the destination as it was and no temporary behind. (A whole
directory, an export, is placed the same way by ``surgery.export_target``.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` then rename onto ``path``; the temporary keeps ``path``'s suffix (writers pick formats by it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))
