"""Small helpers for nested dicts of tensors and optimizer state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def dict_apply(x: dict[str, Any], func: Callable[[Any], Any]) -> dict[str, Any]:
    """Apply ``func`` to every leaf of a (possibly nested) dict, keeping its structure."""
    return {k: dict_apply(v, func) if isinstance(v, dict) else func(v) for k, v in x.items()}


def optimizer_to(optimizer: torch.optim.Optimizer, device: torch.device | str) -> torch.optim.Optimizer:
    """Move an optimizer's state tensors (e.g. Adam moments) to ``device`` in place."""
    for state in optimizer.state.values():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                state[k] = v.to(device=device)
    return optimizer
