"""Construction checks on shapes: the UNet's sequence length, ``shape_meta`` and the encoder's output."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from diffusion_policy.model.vision.obs_shape_meta import parse_obs_meta


def action_dim_from_shape_meta(shape_meta: Mapping) -> int:
    """``shape_meta["action"]["shape"]`` -> Da, with a one-line error when it is missing or not 1-D."""
    if "action" not in shape_meta or "shape" not in shape_meta["action"]:
        raise ValueError("shape_meta has no action shape; add e.g. action: {shape: [2]}")
    shape = list(shape_meta["action"]["shape"])
    if len(shape) != 1:
        raise ValueError(f"shape_meta action shape {shape} must be 1-D, e.g. [2]")
    return int(shape[0])


def check_sequence_length(model: nn.Module, length: int, what: str) -> None:
    """The UNet halves the sequence ``len(down_dims) - 1`` times, so its length must divide evenly."""
    factor = getattr(model, "downsample_factor", 1)
    if length % factor != 0:
        raise ValueError(
            f"{what}={length} is not divisible by {factor} = 2 ** (len(down_dims) - 1) of the UNet; "
            f"use a multiple of {factor} or fewer down_dims"
        )


def shape_meta_obs_shapes(shape_meta: Mapping) -> dict[str, tuple[int, ...]]:
    """``shape_meta["obs"]`` -> {key: shape} in shape_meta order: the keys the policy normalizes and reads."""
    obs = shape_meta.get("obs") if isinstance(shape_meta, Mapping) else None
    if not obs:
        raise ValueError("shape_meta has no 'obs' entry; list the observation keys with shape and type")
    return {key: shape for key, (shape, _) in parse_obs_meta(obs).items()}


def encoder_feature_dim(obs_encoder: nn.Module) -> int:
    """Per-frame feature size F of an encoder {key: (N, *shape)} -> (N, F), from its ``output_shape()``."""
    output_shape = getattr(obs_encoder, "output_shape", None)
    if not callable(output_shape):
        raise ValueError(
            f"obs_encoder {type(obs_encoder).__name__} has no output_shape(); "
            "the policy needs it to size its denoiser"
        )
    shape = tuple(output_shape())
    if len(shape) != 1:
        raise ValueError(f"obs_encoder output_shape() is {shape}; the policy needs flat features (F,)")
    return int(shape[0])
