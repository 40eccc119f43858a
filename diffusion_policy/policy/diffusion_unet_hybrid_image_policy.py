"""Diffusion Policy on image + low-dim observations: ResNet-18 keypoint encoder + 1D UNet ("hybrid")."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from diffusion_policy.model.vision.robomimic_style_obs_encoder import RobomimicStyleObsEncoder
from diffusion_policy.policy.diffusion_unet_image_policy import DiffusionUnetImagePolicy
from diffusion_policy.policy.shape_checks import action_dim_from_shape_meta, shape_meta_obs_shapes


def hybrid_obs_encoder(
    shape_meta: Mapping, crop_shape, group_norm: bool, eval_fixed_crop: bool, backbone_width: int
) -> RobomimicStyleObsEncoder:
    """The hybrid policies' encoder from their constructor arguments, after the cheap ``shape_meta`` checks
    (so a bad one fails before a ResNet is built)."""
    shape_meta_obs_shapes(shape_meta)
    action_dim_from_shape_meta(shape_meta)
    return RobomimicStyleObsEncoder(
        shape_meta["obs"], crop_shape, group_norm, eval_fixed_crop, backbone_width=backbone_width
    )


class DiffusionUnetHybridImagePolicy(DiffusionUnetImagePolicy):
    """:class:`DiffusionUnetImagePolicy` with the robomimic-style encoder (ResNet-18 trunk -> spatial
    softmax -> Linear -> ReLU per rgb key, 64 features; low-dim keys raw; 66 per frame for PushT).

    ``crop_shape`` random-crops rgb inputs in training (center crop in eval with ``eval_fixed_crop``);
    ``obs_encoder_group_norm`` swaps the encoder's BatchNorm for GroupNorm (needed with EMA);
    ``obs_encoder_backbone_width`` (not in the original) narrows the ResNet-18 trunks (64: torchvision's).
    Everything else (sampling, loss, action window, ``select_action``) is the base class's.
    Extra keyword arguments are passed to ``noise_scheduler.step``.
    """

    def __init__(
        self,
        shape_meta: Mapping,
        noise_scheduler: Any,
        horizon: int,
        n_action_steps: int,
        n_obs_steps: int,
        num_inference_steps: int | None = None,
        obs_as_global_cond: bool = True,
        crop_shape: Sequence[int] | None = (76, 76),
        diffusion_step_embed_dim: int = 256,
        down_dims: Sequence[int] = (256, 512, 1024),
        kernel_size: int = 5,
        n_groups: int = 8,
        cond_predict_scale: bool = True,
        obs_encoder_group_norm: bool = False,
        obs_encoder_backbone_width: int = 64,
        eval_fixed_crop: bool = False,
        **kwargs,
    ) -> None:
        obs_encoder = hybrid_obs_encoder(
            shape_meta, crop_shape, obs_encoder_group_norm, eval_fixed_crop, obs_encoder_backbone_width
        )
        super().__init__(
            shape_meta=shape_meta,
            noise_scheduler=noise_scheduler,
            obs_encoder=obs_encoder,
            horizon=horizon,
            n_action_steps=n_action_steps,
            n_obs_steps=n_obs_steps,
            num_inference_steps=num_inference_steps,
            obs_as_global_cond=obs_as_global_cond,
            diffusion_step_embed_dim=diffusion_step_embed_dim,
            down_dims=down_dims,
            kernel_size=kernel_size,
            n_groups=n_groups,
            cond_predict_scale=cond_predict_scale,
            **kwargs,
        )
