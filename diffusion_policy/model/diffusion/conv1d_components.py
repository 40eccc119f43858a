"""Temporal conv building blocks of the 1D UNet; all tensors are (B, C, T)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Below this fan-in (in_channels * kernel_size) oneDNN's conv is the faster way on a CPU; above it, the same
# conv as one matrix product. Measured forward + backward at batch 256 on a 2-core Xeon with AVX-512/AMX
# (docs/results.md, "Training speed"): at 512 channels x 5 taps 1.0-1.3x (fp32) and 1.0-3.6x (bf16), at 1024
# 1.2-1.7x / 1.3-5.6x, at 2048 1.7-2.5x / 1.7-5.7x; at 256 channels and below the conv is as fast or faster.
GEMM_MIN_FAN_IN = 2560


def conv1d_as_matmul(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, padding: int
) -> torch.Tensor:
    """``F.conv1d(x, weight, bias, stride, padding)`` as unfold + one matrix product (im2col).

    x (B, C_in, T), weight (C_out, C_in, K) -> (B, C_out, T_out). Its backward is two more matrix products,
    which the CPU's BLAS runs far faster than oneDNN's conv backward when T is short and C_in wide.
    """
    b, c, _ = x.shape
    out_channels, _, k = weight.shape
    cols = F.pad(x, (padding, padding)).unfold(2, k, stride)  # (B, C_in, T_out, K)
    t_out = cols.shape[2]
    cols = cols.permute(0, 2, 1, 3).reshape(b * t_out, c * k)
    w = weight.reshape(out_channels, c * k).t()
    y = cols @ w if bias is None else torch.addmm(bias, cols, w)
    return y.reshape(b, t_out, out_channels).permute(0, 2, 1)


class TemporalConv1d(nn.Conv1d):
    """``nn.Conv1d`` (same arguments, initial weights and state-dict keys) that trains faster on a CPU.

    In training mode with gradients, on a CPU, and when ``in_channels * kernel_size >= gemm_min_fan_in``,
    the conv runs as :func:`conv1d_as_matmul`; otherwise (GPU, inference, export, narrow layers) it is the
    plain conv. Both compute the same function (to float rounding). ``gemm_min_fan_in = None`` switches the
    matrix-product path off (benchmarks compare the two that way).
    """

    gemm_min_fan_in: int | None = GEMM_MIN_FAN_IN

    def _uses_matmul(self, x: torch.Tensor) -> bool:
        return (
            self.gemm_min_fan_in is not None
            and self.training
            and x.device.type == "cpu"
            and torch.is_grad_enabled()
            and self.in_channels * self.kernel_size[0] >= self.gemm_min_fan_in
            and self.groups == 1
            and self.dilation[0] == 1
            and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
        )

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self._uses_matmul(x):
            return conv1d_as_matmul(x, weight, bias, self.stride[0], self.padding[0])
        return super()._conv_forward(x, weight, bias)


def set_conv_matmul(module: nn.Module, min_fan_in: int | None) -> None:
    """Set ``gemm_min_fan_in`` of every :class:`TemporalConv1d` in ``module`` (None: plain convs only)."""
    for m in module.modules():
        if isinstance(m, TemporalConv1d):
            m.gemm_min_fan_in = min_fan_in


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
        super().__init__(TemporalConv1d(dim, dim, 3, 2, 1))


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
            TemporalConv1d(inp_channels, out_channels, kernel_size, padding=kernel_size // 2),
            nn.GroupNorm(n_groups, out_channels),
            nn.Mish(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, T) -> (B, C_out, T)."""
        return self.block(x)
