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


def read_utf8(path: Path, error: type[Exception], what: str) -> str:
    """The UTF-8 text of ``path`` (a ``what``: "text file", "YAML config file"); every problem raises ``error``
    naming the file, and for an undecodable byte its line and column."""
    if path.is_dir():
        raise error(f"{path}: is a directory, not a {what}")
    if not path.is_file():
        raise error(f"{path}: not a regular file" if path.exists() else f"{what} not found: {path}")
    try:
        data = path.read_bytes()
        return data.decode("utf-8")
    except OSError as problem:
        raise error(f"{path}: cannot read ({problem.strerror})") from None
    except UnicodeDecodeError as problem:
        line = data.count(b"\n", 0, problem.start) + 1
        column = problem.start - data.rfind(b"\n", 0, problem.start)
        raise error(f"{path}: not UTF-8 text (byte 0x{data[problem.start]:02x} at line {line}, column {column}); "
                    "convert it to UTF-8") from None


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (a process we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True
