"""Who owns a study directory and what may live in it: one writer at a time, a lock released by the kernel.

The lock is ``flock`` on the directory itself, so the kernel releases it when the holder exits or is killed
(SIGKILL included); the file ``.lock`` only says who holds it. A directory keeps its storage and study name.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import time
from pathlib import Path

from surgery.errors import UserError
from surgery.files import atomic_write_text, pid_alive

LOCK_INFO = ".lock"
CONFIG_COPY = "config.yaml"
# names `run` writes into a study directory (a directory holding only these is a study interrupted early)
OWN_NAMES = frozenset({CONFIG_COPY, "study.db", "study.db-journal", "study.db-wal", "study.db-shm", LOCK_INFO,
                       "latency_profile.json", "tune", "trials.csv", "front.csv", "pareto.png", "pareto.html",
                       "layers.png", "summary.md", "confirm"})
_TEMPORARY = re.compile(r"^\..+\.(\d+)\.tmp(\.[^.]+)?$")  # surgery.files.atomic_write's temporary names


class StudyDirError(UserError):
    """A study directory that is missing, in use, foreign or holds a study made with other settings."""


# ownership -------------------------------------------------------------------------------------------------
def is_study_dir(path: Path) -> bool:
    """A directory holding a study's ``config.yaml`` (it parses as a study config)."""
    from search.config import ConfigError, load_config

    try:
        load_config(Path(path) / CONFIG_COPY)
    except (ConfigError, OSError):
        return False
    return True


def output_dir_problem(out: Path) -> str | None:
    """Why ``out`` cannot hold a study: a file, or a directory with files that are not a depthsearch study."""
    if out.exists() and not out.is_dir():
        return f"output_dir: {out} exists and is not a directory"
    if not out.is_dir():
        return _creatable(out)
    try:
        names = sorted(p.name for p in out.iterdir())
    except OSError as error:
        return f"output_dir: cannot read {out} ({error.strerror})"
    if not names or is_study_dir(out) or set(names) <= OWN_NAMES:
        return None if os.access(out, os.W_OK | os.X_OK) else f"output_dir: {out} is not writable"
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    return (f"output_dir: {out} exists and is not a depthsearch study directory (holds {shown}); "
            "use a new or empty directory")


def _creatable(path: Path) -> str | None:
    """None when ``path`` can be created: its nearest existing ancestor is a writable directory."""
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"output_dir: cannot create {path}: {parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"output_dir: cannot create {path}: {parent} is not writable"
    return None


def make_dirs(path: Path) -> list[Path]:
    """``mkdir -p path``; returns the directories it created (deepest last), for :func:`remove_if_empty`."""
    created = []
    for folder in reversed([path, *path.absolute().parents]):
        if not folder.exists():
            created.append(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StudyDirError(f"output_dir: cannot create {path} ({error.strerror})") from None
    return created


def remove_if_empty(created: list[Path]) -> None:
    """Undo :func:`make_dirs` for directories still empty (after a failure)."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            return


class StudyLock:
    """Exclusive ownership of a study directory while a command writes into it (``with StudyLock(dir, "run"):``)."""

    def __init__(self, directory: Path, command: str):
        self.directory, self.command, self._fd = Path(directory), command, None

    def __enter__(self) -> StudyLock:
        try:
            fd = os.open(self.directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError as error:
            raise StudyDirError(f"{self.directory}: cannot open the study directory ({error.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StudyDirError(f"{self.directory} is in use by {self.holder()}; wait for it to finish (or stop "
                                "it), then run this command again") from None
        self._fd = fd
        self._write_info()
        remove_stale_temporaries(self.directory)
        return self

    def __exit__(self, *exc) -> None:
        info = self.directory / LOCK_INFO
        try:
            if json.loads(info.read_text(encoding="utf-8")).get("pid") == os.getpid():
                info.unlink()
        except (OSError, ValueError):
            pass
        os.close(self._fd)  # releases the flock
        self._fd = None

    def _write_info(self) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            atomic_write_text(self.directory / LOCK_INFO, json.dumps(info))
        except OSError:
            pass  # the flock alone still protects; only the holder's name is lost

    def holder(self) -> str:
        try:
            info = json.loads((self.directory / LOCK_INFO).read_text(encoding="utf-8"))
            return f"`{info['command']}` (pid {info['pid']} on {info['host']}, since {info['since']})"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Temporary files of atomic writes (``.<name>.<pid>.tmp<suffix>``) left by a process that was killed."""
    removed = []
    for path in directory.glob(".*.tmp*"):
        match = _TEMPORARY.match(path.name)
        if match and path.is_file() and not pid_alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def storage_change_problem(out: Path, url: str, name: str) -> str | None:
    """A study directory keeps its storage and study name: a config naming others would leave the stored study
    behind."""
    from search.config import ConfigError, load_config
    from search.storage import absolute_storage, shown_url, storage_url

    copy = Path(out) / CONFIG_COPY
    if not copy.is_file():
        return None
    try:
        config = load_config(copy)
    except ConfigError:
        return None
    stored = storage_url(config.storage, out)
    if absolute_storage(stored) != absolute_storage(url):
        return (f"storage: {out} holds a study stored in {shown_url(stored)}, not {shown_url(url)}; use that "
                "storage or another output_dir")
    if config.study_name != name:
        return (f"study_name: {out} holds the study {config.study_name!r}, not {name!r}; use that name or another "
                "output_dir")
    return None
