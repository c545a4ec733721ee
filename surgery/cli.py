"""What every command line of the project shares: one-line argument errors, user errors as exit 2, signals.

``run_cli`` runs a command: a :class:`~surgery.errors.UserError` or a full disk prints one ``error:`` line and
exits 2; SIGINT / SIGTERM raise :class:`Interrupted` (not ``KeyboardInterrupt``, which Optuna would record as a
failed trial), which unwinds the command's cleanup and exits ``128 + signal``; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator

from .errors import UserError

DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
DISK_FULL_TEXT = ("no space left on device", "database or disk is full", "file too large", "disk quota exceeded")


class Interrupted(BaseException):
    """SIGINT or SIGTERM: stop now, let ``finally`` blocks clean up (a BaseException, so no ``except Exception``
    and no Optuna trial handler swallows it; the trial in flight stays RUNNING and is resumed)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (flag and value) and exit code 2."""

    def error(self, message: str):
        if message.endswith("expected one argument"):  # a value that starts with "-" reads as a flag
            message += ' (a value that starts with "-", such as a mask "--,AM", is written --flag=value)'
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def _whole_number(text: str, minimum: int) -> int:
    """An integer >= ``minimum``, else an argparse error naming the value."""
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _whole_number(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _whole_number(text, 0)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number in (0, 1)."""
    value = positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {text!r}")
    return value


def _writable_problem(path: Path) -> str | None:
    """Why this command could not create ``path``: no name, or the nearest existing folder above it is not one
    it may write in."""
    if not path.name or path.name in (".", ".."):
        return "expected a file or folder name"
    folder = path.parent.resolve()
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is not a folder"
    try:  # a real write: permissions, read-only mounts and pseudo file systems all answer it
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        return f"cannot write in {folder} ({error.strerror or error})"
    return None


def _output_path(text: str, *, folder: bool) -> Path:
    path = Path(text).expanduser()
    clash = path.is_file() if folder else path.is_dir()
    problem = f"it is a {'file' if folder else 'folder'}" if clash else _writable_problem(path)
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
    return path


def output_file(text: str) -> Path:
    """argparse type: a file this command writes (a name, not a folder, in a folder it can write to)."""
    return _output_path(text, folder=False)


def output_dir(text: str) -> Path:
    """argparse type: a folder this command creates or fills (a name, not a file, in a folder it can write to)."""
    return _output_path(text, folder=True)


def _chain(error: BaseException | None) -> Iterator[BaseException]:
    """``error`` and the exceptions it was raised from or while handling, newest first (each once)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def disk_full(error: BaseException) -> bool:
    """True when ``error`` (or what caused it) says the disk or the file-size limit is full."""
    return any((isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS)
               or any(text in str(e).lower() for text in DISK_FULL_TEXT) for e in _chain(error))


def interruption(error: BaseException) -> Interrupted | None:
    """The :class:`Interrupted` behind ``error``: a library's ``finally`` block can replace the signal's exception
    with one of its own (Optuna's trial bookkeeping raises ``UnboundLocalError`` when a signal lands in it)."""
    return next((e for e in _chain(error) if isinstance(e, Interrupted)), None)


@contextlib.contextmanager
def interrupts_raise() -> Iterator[None]:
    """While inside, SIGINT and SIGTERM raise :class:`Interrupted` (main thread only; handlers restored after)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _stopped(stop: Interrupted) -> int:
    """Tell the user the command stopped cleanly; the exit code a shell gives a process ended by that signal."""
    print(f"interrupted by {stop}: nothing half-written was left; run the same command again to continue",
          file=sys.stderr)
    return 128 + stop.signum


def run_cli(command: Callable[[], int]) -> int:
    """Run ``command``; user errors and a full disk become one ``error:`` line and exit code 2, a signal 128 + its
    number."""
    with interrupts_raise():
        try:
            return command()
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except Interrupted as stop:
            return _stopped(stop)
        except Exception as error:  # noqa: BLE001 - only a stop or a full disk become a message; the rest re-raised
            stop = interruption(error)
            if stop is not None:
                return _stopped(stop)
            if not disk_full(error):
                raise
            where = getattr(error, "filename", None)
            print(f"error: the disk is full{f' writing {where}' if where else ''} ({error}); free space and run "
                  "the same command again (completed work is kept)", file=sys.stderr)
            return 2


# models ------------------------------------------------------------------------------------------------------
LOAD_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, RuntimeError, KeyError)


def remote_code_problem(path, trust_remote_code: bool, flag: str) -> str | None:
    """A local model whose config.json asks to run its own Python code (``auto_map`` to a model type transformers
    does not know) is refused unless the user passed ``flag``; our own pruned exports load without it."""
    import json
    from pathlib import Path

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .pruned_modeling import PREFIX

    config_file = Path(path).expanduser() / "config.json"
    if trust_remote_code or not config_file.is_file():
        return None
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return f"{config_file}: not a readable JSON model config ({error})"
    if not isinstance(data, dict):
        return f"{config_file}: expected a JSON object, got {type(data).__name__}"
    model_type = str(data.get("model_type", ""))
    if data.get("auto_map") and model_type not in CONFIG_MAPPING and not model_type.startswith(PREFIX):
        return (f"{path} ships its own Python code (config.json auto_map {data['auto_map']!r}); it is not run "
                f"unless you pass {flag}")
    return None


def load_checked(name: str, *, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False,
                 flag: str = "--trust-remote-code"):
    """``surgery.load.load_model`` with every way a model folder can be broken turned into one user error naming it
    (remote code refused unless ``trust_remote_code``; a model with no decoder layers refused)."""
    from .families import family_for, get_path
    from .load import ModelLoadError, load_model

    problem = remote_code_problem(name, trust_remote_code, flag)
    if problem:
        raise ModelLoadError(problem)
    try:
        model, tokenizer = load_model(name, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    except UserError:
        raise
    except LOAD_ERRORS as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ModelLoadError(f"cannot load model {name}: {type(error).__name__}: {first}") from error
    except Exception as error:  # safetensors' own error type: a damaged weight file
        if type(error).__name__ != "SafetensorError":
            raise
        raise ModelLoadError(f"cannot load model {name}: damaged weight file ({error})") from error
    if len(get_path(model, family_for(model.config).layers)) == 0:
        raise ModelLoadError(f"model {name} has no decoder layers (num_hidden_layers: 0)")
    return model, tokenizer
