"""Diffusion Policy on image + low-dim observations: any observation encoder + 1D UNet.

``DiffusionUnetImagePolicy`` takes a ready encoder (the original's pure-torch recipe passes a
``MultiImageObsEncoder`` over a torchvision ResNet-18); ``DiffusionUnetHybridImagePolicy`` is this policy
with the robomimic-style keypoint encoder built from its own arguments.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from diffusion_policy.model.diffusion.conditional_unet1d import ConditionalUnet1D
from diffusion_policy.policy.action_window import ActionWindow
from diffusion_policy.policy.denoising import inpainting_condition
from diffusion_policy.policy.diffusion_policy_base import ImageDiffusionPolicy, Inputs
from diffusion_policy.policy.shape_checks import (
    action_dim_from_shape_meta,
    check_sequence_length,
    encoder_feature_dim,
    shape_meta_obs_shapes,
)


class DiffusionUnetImagePolicy(ImageDiffusionPolicy):
    """Encodes the last ``n_obs_steps`` observation frames (keys of ``shape_meta["obs"]``) with
    ``obs_encoder`` and denoises a ``horizon`` of actions with a ConditionalUnet1D built here.

    ``obs_encoder`` maps one normalized frame per sample, {key: (N, *shape)}, to (N, F) and reports F as
    ``output_shape()[0]``. With ``obs_as_global_cond`` (the default, and the PushT configs) the To
    per-frame features are one global condition (To * F); otherwise the UNet inpaints [action, features].
    Executed actions are ``action_pred[:, n_obs_steps - 1 : n_obs_steps - 1 + n_action_steps]``.
    Extra keyword arguments are passed to ``noise_scheduler.step``.

    State dict: ``obs_encoder.*``, ``model.*`` (the UNet), ``mask_generator.*``, ``normalizer.*``.
    """

    def __init__(
        self,
        shape_meta: Mapping,
        noise_scheduler: Any,
        obs_encoder: nn.Module,
        horizon: int,
        n_action_steps: int,
        n_obs_steps: int,
        num_inference_steps: int | None = None,
        obs_as_global_cond: bool = True,
        diffusion_step_embed_dim: int = 256,
        down_dims: Sequence[int] = (256, 512, 1024),
        kernel_size: int = 5,
        n_groups: int = 8,
        cond_predict_scale: bool = True,
        **kwargs,
    ) -> None:
        obs_shapes = shape_meta_obs_shapes(shape_meta)
        action_dim = action_dim_from_shape_meta(shape_meta)
        obs_feature_dim = encoder_feature_dim(obs_encoder)
        model = ConditionalUnet1D(
            input_dim=action_dim if obs_as_global_cond else action_dim + obs_feature_dim,
            local_cond_dim=None,
            global_cond_dim=obs_feature_dim * n_obs_steps if obs_as_global_cond else None,
            diffusion_step_embed_dim=diffusion_step_embed_dim,
            down_dims=down_dims,
            kernel_size=kernel_size,
            n_groups=n_groups,
            cond_predict_scale=cond_predict_scale,
        )
        check_sequence_length(model, horizon, "horizon")
        window = ActionWindow(horizon, n_obs_steps, n_action_steps, action_dim)
        inpaint_dim = 0 if obs_as_global_cond else obs_feature_dim
        super().__init__(
            model, noise_scheduler, window, obs_shapes, num_inference_steps, kwargs, inpaint_dim, obs_encoder
        )
        self.obs_feature_dim = obs_feature_dim
        self.obs_as_global_cond = obs_as_global_cond

    def prediction_inputs(self, obs_dict: Mapping[str, torch.Tensor]) -> Inputs:
        """obs_dict[key]: (B, >=To, *shape) raw (images float in [0, 1]) -> the UNet's condition."""
        features = self.encode(obs_dict, self.n_obs_steps)
        B = features.shape[0]
        if self.obs_as_global_cond:
            data = torch.zeros(B, self.horizon, self.action_dim, device=self.device, dtype=self.dtype)
            return data, None, {"global_cond": features.reshape(B, -1)}
        data, mask = inpainting_condition(features, self.horizon, self.action_dim)
        return data, mask, {}

    def training_inputs(self, batch: Mapping[str, Any]) -> Inputs:
        """batch: {"obs": {key: (B, T, *shape)}, "action": (B, T, Da)} raw. Only the first n_obs_steps
        frames are normalized and encoded in the global-condition mode."""
        nactions = self.normalizer["action"].normalize(batch["action"])
        B, T = nactions.shape[:2]
        if self.obs_as_global_cond:
            global_cond = self.encode(batch["obs"], self.n_obs_steps).reshape(B, -1)
            return nactions, None, {"global_cond": global_cond}
        trajectory = torch.cat([nactions, self.encode(batch["obs"], T)], dim=-1).detach()
        return trajectory, self.mask_generator(trajectory.shape), {}
