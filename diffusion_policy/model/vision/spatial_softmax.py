"""Spatial soft-argmax keypoints (Levine et al., 2016), as robomimic's ``SpatialSoftmax``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class SpatialSoftmax(nn.Module):
    """(N, C, H, W) feature map -> (N, num_kp, 2) expected (x, y) positions in [-1, 1].

    A 1x1 conv maps C channels to ``num_kp`` heatmaps; each is softmax-normalised over its H*W pixels
    (divided by a fixed ``temperature``) and the keypoint is the softmax-weighted mean of a
    ``linspace(-1, 1)`` pixel grid. Buffer names (``pos_x``, ``pos_y``, ``temperature``) follow robomimic.
    """

    def __init__(self, input_shape: Sequence[int], num_kp: int = 32, temperature: float = 1.0) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"SpatialSoftmax: input_shape={tuple(input_shape)} must be (C, H, W)")
        channels, height, width = (int(s) for s in input_shape)
        if temperature <= 0:
            raise ValueError(f"SpatialSoftmax: temperature={temperature} must be > 0")
        self.input_shape = (channels, height, width)
        self.num_kp = num_kp
        self.nets = nn.Conv2d(channels, num_kp, kernel_size=1)
        self.register_buffer("temperature", torch.ones(1) * temperature)
        pos_x, pos_y = torch.meshgrid(
            torch.linspace(-1.0, 1.0, width), torch.linspace(-1.0, 1.0, height), indexing="xy"
        )
        self.register_buffer("pos_x", pos_x.reshape(1, height * width))
        self.register_buffer("pos_y", pos_y.reshape(1, height * width))

    def output_shape(self) -> tuple[int, int]:
        return (self.num_kp, 2)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        """feature: (N, C, H, W) -> (N, num_kp, 2)."""
        if tuple(feature.shape[1:]) != self.input_shape:
            raise ValueError(
                f"SpatialSoftmax: got feature map {tuple(feature.shape[1:])}, built for {self.input_shape}"
            )
        logits = self.nets(feature).flatten(2)  # (N, K, H*W)
        attention = torch.softmax(logits / self.temperature, dim=-1)
        expected_x = (attention * self.pos_x).sum(dim=-1)
        expected_y = (attention * self.pos_y).sum(dim=-1)
        return torch.stack((expected_x, expected_y), dim=-1)
