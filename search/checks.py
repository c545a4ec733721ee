"""Checks of the world a config points at, made before anything is written: devices, storage URLs, model positions.

Each function returns problems as ``key: what (got value)`` lines (empty when fine), so a command reports them
all at once; none of them writes anything.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from urllib.parse import quote


# devices ---------------------------------------------------------------------------------------------------
def device_problem(key: str, name: str) -> str | None:
    """Why ``name`` is not a usable device on this machine (``auto``, ``cpu``, ``cuda[:N]``, ``mps``)."""
    import torch

    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        return f"{key}: not a device name; use auto, cpu, cuda or cuda:N (got {name!r})"
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return f"{key}: CUDA is not available on this machine (got {name!r}); use auto or cpu"
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            return f"{key}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1} (got {name!r})"
        return None
    if device.type == "mps":
        return None if torch.backends.mps.is_available() else f"{key}: MPS is not available here (got {name!r})"
    return f"{key}: device type {device.type!r} is not supported; use auto, cpu or cuda[:N] (got {name!r})"


# model positions -------------------------------------------------------------------------------------------
def max_positions(model_config) -> int | None:
    """The longest sequence the model's config supports (None when it does not say)."""
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model_config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def positions_problems(model_config, lengths: dict[str, int], where: str) -> list[str]:
    """One problem per ``key -> tokens`` longer than the model's positions (``where`` names the model)."""
    limit = max_positions(model_config)
    if limit is None:
        return []
    return [f"{key}: {tokens} tokens exceed the {limit} positions of {where} (max_position_embeddings)"
            for key, tokens in lengths.items() if tokens > limit]


# storage ---------------------------------------------------------------------------------------------------
def is_journal(url: str) -> bool:
    return url.endswith(".log") and "://" not in url


def _within(path: Path, folder: Path) -> bool:
    return path.absolute() == folder.absolute() or folder.absolute() in path.absolute().parents


def _file_problems(key: str, url: str, path: Path, study_dir: Path, *, must_exist: bool) -> list[str]:
    if path.exists():
        if not path.is_file():
            return [f"{key}: {path} is not a file (got {url!r})"]
        if not os.access(path, os.R_OK):
            return [f"{key}: {path} is not readable (got {url!r})"]
        return []
    if must_exist:
        return [f"{key}: {path} does not exist (got {url!r})"]
    parent = path.absolute().parent
    if not parent.is_dir() and not _within(parent, study_dir):
        return [f"{key}: the directory {parent} does not exist (got {url!r})"]
    return []


def _sqlite_problems(key: str, url: str, study_dir: Path, must_exist: bool) -> list[str]:
    from sqlalchemy.engine import make_url

    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file::memory:"):
        return [f"{key}: an in-memory SQLite database keeps nothing and cannot be resumed; give a file (got {url!r})"]
    path = Path(database)
    problems = _file_problems(key, url, path, study_dir, must_exist=must_exist)
    if problems or not path.exists():
        return problems
    try:
        with sqlite3.connect(f"file:{quote(str(path.absolute()))}?mode=ro", uri=True, timeout=5) as conn:
            tables = {row[0] for row in conn.execute("select name from sqlite_master where type = 'table'")}
    except sqlite3.Error as error:
        return [f"{key}: {path} is not a readable SQLite database ({error}) (got {url!r})"]
    if tables and "studies" not in tables:
        shown = ", ".join(sorted(tables)[:5])
        return [f"{key}: {path} is an SQLite database of something else (tables {shown}), not an Optuna storage"]
    return []


def _journal_problems(key: str, url: str, study_dir: Path, must_exist: bool) -> list[str]:
    path = Path(url)
    problems = _file_problems(key, url, path, study_dir, must_exist=must_exist)
    if problems or not path.exists():
        return problems
    try:
        with open(path, "rb") as handle:
            first = handle.readline(1 << 20)
        if first.strip() and "op_code" not in json.loads(first):
            raise ValueError("no op_code")
    except (OSError, ValueError, TypeError) as error:
        return [f"{key}: {path} is not an Optuna journal file ({error}); give a new .log path"]
    return []


def shown_url(url: str) -> str:
    """``url`` with any password hidden."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL at all: shown as given
        return url


def _remote_problems(key: str, url: str) -> list[str]:
    from sqlalchemy import create_engine

    engine = None
    try:
        backend = url.split("://", 1)[0].split("+", 1)[0]
        timeout = {"connect_timeout": 10} if backend in ("postgresql", "mysql", "mariadb") else {}
        engine = create_engine(url, connect_args=timeout)
        with engine.connect():
            pass
    except Exception as error:  # noqa: BLE001 - any failure to reach a storage is the user's to fix
        first = (str(error).strip().splitlines() or [""])[0]
        return [f"{key}: cannot connect to {shown_url(url)} ({type(error).__name__}: {first})"]
    finally:
        if engine is not None:
            engine.dispose()
    return []


def storage_problems(url: str, study_dir: Path, *, key: str = "storage", must_exist: bool = False) -> list[str]:
    """Why ``url`` cannot serve as this study's Optuna storage; ``must_exist`` for commands that only read it."""
    if "\0" in url:
        return [f"{key}: contains a NUL character (got {url!r})"]
    if is_journal(url):
        return _journal_problems(key, url, Path(study_dir), must_exist)
    if "://" not in url:
        return [f"{key}: expected an Optuna storage URL (sqlite:///..., postgresql://...) or a journal file ending "
                f".log (got {url!r})"]
    try:
        if url.split("://", 1)[0].split("+", 1)[0] == "sqlite":
            return _sqlite_problems(key, url, Path(study_dir), must_exist)
    except Exception as error:  # noqa: BLE001 - a malformed URL
        return [f"{key}: not a valid storage URL ({error}) (got {url!r})"]
    return _remote_problems(key, url)


def absolute_storage(url: str | None) -> str | None:
    """``url`` with a relative SQLite or journal file path made absolute (so it means the same from any folder)."""
    if url is None or "\0" in url:
        return url
    if is_journal(url):
        return str(Path(url).absolute())
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////") and url != "sqlite:///:memory:":
        return f"sqlite:///{Path(url[len('sqlite:///'):]).absolute()}"
    return url
