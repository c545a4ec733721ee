"""Where an export may go, and how it gets there without a moment of half-written or lost files.

An export directory holds ``depthsearch-export.json``, listing the files the export wrote. ``force`` replaces
only such a directory, and only when it holds nothing else: never a study, the source model, a folder holding
either, or anything the user made. The export is written under a staging name carrying the writer's pid beside
the target and renamed into place; staging (and set-aside) directories left by a killed export are cleaned up
by the next export to the same target (a set-aside previous export is put back if the target is missing).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from .errors import UserError
from .files import pid_alive

MARKER = "depthsearch-export.json"
_LEFTOVER = re.compile(r"\.(tmp|old)-(\d+)-")


class ExportError(UserError):
    """An export that cannot be done: a target that must not be written or replaced, or a mask leaving no model."""


def _holds(folder: Path, path: Path) -> bool:
    folder, path = folder.resolve(), path.resolve()
    return path == folder or folder in path.parents


def foreign_entries(out_dir: Path) -> str | None:
    """Why ``out_dir`` is not a previous export of this tool that ``force`` may replace (None when it is)."""
    try:
        record = json.loads((out_dir / MARKER).read_text(encoding="utf-8"))
        listed = set(record["files"]) | {MARKER}
    except (OSError, ValueError, KeyError, TypeError):
        return f"it was not written by a depthsearch export (no readable {MARKER})"
    extra = sorted(p.name for p in out_dir.iterdir() if p.name not in listed)
    if extra:
        return f"it holds files the export did not write ({', '.join(extra[:5])})"
    return None


def check_target(out_dir: Path, force: bool, *, protect: tuple[tuple[str, Path], ...] = ()) -> None:
    """Refuse a target that is a file or symlink, is or holds a protected path (``(what, path)`` pairs: the source
    model, the study), is not empty (without ``force``), or is not a previous export (with ``force``)."""
    out_dir = Path(out_dir)
    if "\0" in str(out_dir):
        raise ExportError(f"--out {str(out_dir)!r} contains a NUL character")
    if out_dir.is_symlink():
        raise ExportError(f"--out {out_dir} is a symbolic link; give the directory it points to")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"--out {out_dir} exists and is not a directory")
    for what, path in protect:
        if path is not None and Path(path).exists() and _holds(out_dir, Path(path)):
            raise ExportError(f"--out {out_dir} is or holds {what} {path}; choose another directory")
    _check_parent(out_dir)
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not force:
        raise ExportError(f"--out {out_dir} exists and is not empty (--force replaces a previous export)")
    why = foreign_entries(out_dir)
    if why:
        raise ExportError(f"--out {out_dir}: --force only replaces a previous export, and {why}; "
                          "remove it yourself or choose another directory")


def _check_parent(out_dir: Path) -> None:
    parent = out_dir.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"--out {out_dir}: cannot write into {parent} (not a writable directory)")


def staging_dir(out_dir: Path) -> Path:
    """A fresh staging directory beside ``out_dir``, named with this process's pid (so leftovers are known)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # the export's mode as a plain mkdir would give it, not mkdtemp's private 0700
    return staging


def write_marker(staging: Path, record: dict) -> None:
    """The ownership record, written last: every file the export holds."""
    files = sorted(p.name for p in staging.iterdir())
    (staging / MARKER).write_text(json.dumps({**record, "files": files}, indent=1), encoding="utf-8")


def install(staging: Path, out_dir: Path) -> None:
    """Move the finished export into place, the previous export set aside until then."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}-{staging.name}")
        out_dir.rename(old)
    try:
        staging.rename(out_dir)
    except OSError as error:  # another export to the same target got there between the two renames
        if old is not None and not out_dir.exists():
            old.rename(out_dir)
        raise ExportError(f"--out {out_dir}: another process wrote it at the same time ({error.strerror}); "
                          "run the export again") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)



def clean_leftovers(out_dir: Path) -> list[Path]:
    """Remove staging directories of dead exports to ``out_dir``; put a set-aside export back if the target is
    gone (a kill between the two renames of :func:`install`). Returns what was removed."""
    removed = []
    if not out_dir.parent.is_dir():
        return removed
    for path in sorted(out_dir.parent.glob(f".{glob_escape(out_dir.name)}.*-*")):
        match = _LEFTOVER.match(path.name[len(out_dir.name) + 1:])
        if not match or not path.is_dir() or path.is_symlink() or pid_alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and not out_dir.exists():
            path.rename(out_dir)
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)
