"""Random crop for training, center crop for evaluation (image observations)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class CropRandomizer(nn.Module):
    """(N, C, H, W) -> (N, C, crop_height, crop_width).

    Training mode: an independent random crop per image. The top-left offset is uniform over every valid
    position ``0 .. H - crop_height`` (inclusive). The original drew ``floor((H - ch) * U[0, 1))``, never
    using the last offset; including it makes the crop distribution symmetric about the center crop.
    Eval mode: the center crop (torchvision's rounding), unless ``fixed_crop_in_eval=False``, which keeps
    random crops in eval like robomimic's randomizer (the original's ``eval_fixed_crop=False``).
    Only ``num_crops=1`` without positional encoding (the diffusion policies' setting) is supported.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        crop_height: int,
        crop_width: int,
        num_crops: int = 1,
        pos_enc: bool = False,
        fixed_crop_in_eval: bool = True,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"CropRandomizer: input_shape={tuple(input_shape)} must be (C, H, W)")
        if num_crops != 1 or pos_enc:
            raise ValueError(
                f"CropRandomizer: only num_crops=1 and pos_enc=False are supported "
                f"(got {num_crops}, {pos_enc})"
            )
        _, height, width = (int(s) for s in input_shape)
        if not (0 < crop_height <= height and 0 < crop_width <= width):
            raise ValueError(
                f"CropRandomizer: crop ({crop_height}, {crop_width}) does not fit image ({height}, {width}); "
                "use a crop_shape no larger than the image"
            )
        self.input_shape = tuple(int(s) for s in input_shape)
        self.crop_height = int(crop_height)
        self.crop_width = int(crop_width)
        self.fixed_crop_in_eval = fixed_crop_in_eval

    def output_shape(self) -> tuple[int, int, int]:
        return (self.input_shape[0], self.crop_height, self.crop_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) -> (N, C, crop_height, crop_width)."""
        n, _, height, width = x.shape
        ch, cw = self.crop_height, self.crop_width
        if self.training or not self.fixed_crop_in_eval:
            # one gather for the whole batch instead of a Python loop over images
            top = torch.randint(0, height - ch + 1, (n, 1, 1), device=x.device)
            left = torch.randint(0, width - cw + 1, (n, 1, 1), device=x.device)
            rows = top + torch.arange(ch, device=x.device)[None, :, None]
            cols = left + torch.arange(cw, device=x.device)[None, None, :]
            batch = torch.arange(n, device=x.device)[:, None, None]
            # advanced indices around a slice put the indexed dims first: (N, ch, cw, C)
            return x[batch, :, rows, cols].permute(0, 3, 1, 2).contiguous()
        # int(): under ONNX tracing the sizes are tensors; the crop offsets are constants of the graph
        top = int(round((int(height) - ch) / 2.0))
        left = int(round((int(width) - cw) / 2.0))
        return x[:, :, top : top + ch, left : left + cw]
