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


# training.mixed_precision -> autocast dtype (None, the default, is float32 throughout)
MIXED_PRECISION_DTYPES = {"bf16": torch.bfloat16}


def training_autocast(device: torch.device | str, mixed_precision: str | None) -> torch.autocast:
    """The autocast context of a training forward pass: ``None`` = float32 (off), ``"bf16"`` = bfloat16.

    Only the forward runs in reduced precision; backward follows the recorded graph and the weights, their
    gradients, the optimizer and the EMA stay float32. No loss scaling: bfloat16 has float32's range.
    The returned context can be entered again and again (once per step).
    """
    if mixed_precision is not None and mixed_precision not in MIXED_PRECISION_DTYPES:
        raise ValueError(f"mixed_precision={mixed_precision!r}: choose null (float32) or 'bf16'")
    dtype = MIXED_PRECISION_DTYPES.get(mixed_precision)
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)
