"""Sinusoidal embedding of the (integer) diffusion step."""

from __future__ import annotations

import math

import torch
from torch import nn


class SinusoidalPosEmb(nn.Module):
    """Maps steps (B,) to (B, dim): ``[sin(t * f_k), cos(t * f_k)]`` with ``f_k = 10000^(-k / (dim/2 - 1))``.

    The raw step index is used (0..num_train_timesteps-1), not a [0, 1] time, so checkpoints of the
    original keep their meaning.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim < 4 or dim % 2 != 0:
            raise ValueError(f"SinusoidalPosEmb dim={dim} must be an even number >= 4")
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B,) steps -> (B, dim) float embedding on x's device."""
        half = self.dim // 2
        # frequencies are rebuilt on x's device each call: a few flops, and no host->device copy
        freqs = torch.exp(
            torch.arange(half, device=x.device, dtype=torch.float32) * (-math.log(10000) / (half - 1))
        )
        angles = x.float()[:, None] * freqs[None, :]
        return torch.cat((angles.sin(), angles.cos()), dim=-1)
