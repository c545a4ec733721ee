"""The study's Optuna storage, as a URL: the default in the study directory, the forms it may take (an SQLite file,
a database server, a journal file), its checks before anything is written, and opening it. Every storage-URL rule
lives here; :mod:`search.record` opens a study in it."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from urllib.parse import quote


def is_journal(url: str) -> bool:
    """A plain path ending ``.log``: an Optuna journal file (many processes may share it)."""
    return url.endswith(".log") and "://" not in url


def backend(url: str) -> str:
    """The database kind of a storage URL (``sqlite``, ``postgresql``, ...), without its driver."""
    return url.split("://", 1)[0].split("+", 1)[0]


def url_form_problem(url: str, key: str = "storage") -> str | None:
    """Why ``url`` is not even shaped like a storage: neither a URL nor a journal file."""
    if "://" in url or is_journal(url):
        return None
    return (f"{key}: expected an Optuna storage URL (sqlite:///..., postgresql://...) or a journal file ending .log "
            f"(got {url!r})")


def storage_url(storage: str | None, study_dir: Path | str) -> str:
    """The study's Optuna storage: the configured URL, else an SQLite file in the study directory."""
    return storage or f"sqlite:///{Path(study_dir) / 'study.db'}"


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
        timeout = {"connect_timeout": 10} if backend(url) in ("postgresql", "mysql", "mariadb") else {}
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
    problem = url_form_problem(url, key)
    if problem:
        return [problem]
    try:
        if backend(url) == "sqlite":
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


def storage_exists(url: str) -> bool:
    """Whether ``url``'s storage is already there (a local file), so opening it creates nothing new."""
    if is_journal(url):
        return Path(url).is_file()
    if backend(url) == "sqlite":
        from sqlalchemy.engine import make_url

        return Path(make_url(url).database or "").is_file()
    return True


def open_storage(url: str):
    """An Optuna storage for ``url``; a plain path ending ``.log`` is a journal file (many processes)."""
    if is_journal(url):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(url))
    return url
