"""Checks of the world a config points at, made before anything is written: devices and model positions (storage URLs:
:mod:`search.storage`).

Each function returns problems as ``key: what (got value)`` lines (empty when fine), so a command reports them
all at once; none of them writes anything.
"""

from __future__ import annotations



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
