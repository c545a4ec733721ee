"""Parameter counting: the one definition of "how many parameters" (export, budgets, bench)."""

from __future__ import annotations

from torch import nn


def num_params(*modules: nn.Module) -> int:
    """Distinct parameters of the modules together (a tied or shared weight counts once)."""
    return sum(p.numel() for p in {id(p): p for module in modules for p in module.parameters()}.values())
