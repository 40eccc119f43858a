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


MIXED_PRECISION = {None: None, "bf16": torch.bfloat16}


def training_autocast(device: torch.device | str, mixed_precision: str | None) -> torch.autocast:
    """The autocast context of a training forward pass: ``None`` = float32 (off), ``"bf16"`` = bfloat16.

    Only the forward runs in reduced precision; backward follows the recorded graph and the weights, their
    gradients, the optimizer and the EMA stay float32. No loss scaling: bfloat16 has float32's range.
    """
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision={mixed_precision!r}: choose null (float32) or 'bf16'")
    device_type = torch.device(device).type
    dtype = MIXED_PRECISION[mixed_precision]
    return torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
