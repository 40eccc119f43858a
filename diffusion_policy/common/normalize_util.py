"""Ready-made normalizer fields."""

from __future__ import annotations

import math

import torch

from diffusion_policy.model.common.normalizer import SingleFieldLinearNormalizer


def get_image_range_normalizer() -> SingleFieldLinearNormalizer:
    """Maps image values in [0, 1] to [-1, 1].

    The one-element scale/offset broadcast over any image shape, e.g. (B, To, 3, 96, 96).
    Input stats are those of a uniform [0, 1] variable.
    """
    stats = {
        "min": torch.tensor([0.0]),
        "max": torch.tensor([1.0]),
        "mean": torch.tensor([0.5]),
        "std": torch.tensor([math.sqrt(1 / 12)]),
    }
    return SingleFieldLinearNormalizer.create_manual(
        scale=torch.tensor([2.0]), offset=torch.tensor([-1.0]), input_stats_dict=stats
    )
