"""The one place that knows how transformers releases differ in what this project calls.

transformers 5.25 renamed the KV-cache argument and output field of every model from ``past_key_values`` to
``cache`` (the old names warn until 5.40). Both helpers use whichever name the installed release has, so
the code above them runs on every release ``pyproject.toml`` allows. Checked on the releases named in
``tests/surgery/test_compat.py``.
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any

from torch import nn

CACHE_NAMES = ("cache", "past_key_values")


@lru_cache(maxsize=None)
def _cache_argument(forward_class: type) -> str:
    parameters = inspect.signature(forward_class.forward).parameters
    return next((name for name in CACHE_NAMES if name in parameters), CACHE_NAMES[-1])


def forward_with_cache(model: nn.Module, cache: Any, **inputs: Any) -> Any:
    """``model(**inputs)`` continuing from ``cache``, the argument named as the installed release names it."""
    return model(**inputs, **{_cache_argument(type(model)): cache}, use_cache=True)


def output_cache(output: Any) -> Any:
    """The KV cache a forward returned (``output.cache``, or ``output.past_key_values`` before 5.25)."""
    for name in CACHE_NAMES:
        cache = output.get(name) if hasattr(output, "get") else getattr(output, name, None)
        if cache is not None:
            return cache
    return None
