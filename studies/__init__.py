"""Shipped study configs and the small models, text and benchmark files they use, installed as package data.

Code finds them through :func:`assets` (``importlib.resources``), so they work from a wheel install too.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def assets(*parts: str) -> Path:
    """A path under the bundled ``studies/assets`` folder, e.g. ``assets("benchmarks")``."""
    return Path(str(files(__name__).joinpath("assets", *parts)))


def bundled_study(name: str) -> Path | None:
    """The shipped study config ``<name>.yaml`` (None when there is no such study)."""
    path = Path(str(files(__name__).joinpath(f"{name}.yaml")))
    return path if name and "/" not in name and path.is_file() else None
