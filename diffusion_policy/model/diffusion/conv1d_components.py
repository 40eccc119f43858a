"""Temporal conv building blocks of the 1D UNet; all tensors are (B, C, T)."""

from __future__ import annotations

import torch
from torch import nn


class _Resample1d(nn.Module):
    """Changes T with one strided conv, held as ``conv`` (the original's state-dict key)."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Downsample1d(_Resample1d):
    """Halves T with a stride-2 conv (T must be even)."""

    def __init__(self, dim: int) -> None:
        super().__init__(nn.Conv1d(dim, dim, 3, 2, 1))


class Upsample1d(_Resample1d):
    """Doubles T with a stride-2 transposed conv."""

    def __init__(self, dim: int) -> None:
        super().__init__(nn.ConvTranspose1d(dim, dim, 4, 2, 1))


class Conv1dBlock(nn.Module):
    """Conv1d (same padding) -> GroupNorm -> Mish."""

    def __init__(self, inp_channels: int, out_channels: int, kernel_size: int, n_groups: int = 8) -> None:
        super().__init__()
        if out_channels % n_groups != 0:
            raise ValueError(
                f"Conv1dBlock: out_channels={out_channels} is not divisible by n_groups={n_groups}; "
                "pick channel sizes that are multiples of n_groups"
            )
        # attribute name and Sequential indices match the original's checkpoints (block.0 / block.1)
        self.block = nn.Sequential(
            nn.Conv1d(inp_channels, out_channels, kernel_size, padding=kernel_size // 2),
            nn.GroupNorm(n_groups, out_channels),
            nn.Mish(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, T) -> (B, C_out, T)."""
        return self.block(x)
