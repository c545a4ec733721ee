"""Search strategies: one module each, registered by name in ``STRATEGIES`` (see ``base.py``).

Every module of this package is imported here, so adding a strategy is adding its module.
"""

import importlib
import pkgutil

from .base import STRATEGIES, Strategy, StrategySettingsError, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["STRATEGIES", "Strategy", "StrategySettingsError", "register"]
