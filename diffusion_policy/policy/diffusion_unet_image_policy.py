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
from diffusion_policy.model.vision.obs_shape_meta import parse_obs_meta
from diffusion_policy.policy.base_image_policy import BaseImagePolicy
from diffusion_policy.policy.diffusion_sampling import (
    ImageObsPolicyMixin,
    action_dim_from_shape_meta,
    check_action_window,
    check_scheduler,
    check_sequence_length,
    diffusion_loss,
    init_denoising_state,
    inpainting_condition,
    inpainting_mask_generator,
    sample_action_chunk,
)


def shape_meta_obs_shapes(shape_meta: Mapping) -> dict[str, tuple[int, ...]]:
    """``shape_meta["obs"]`` -> {key: shape} in shape_meta order: the keys the policy normalizes and reads."""
    obs = shape_meta.get("obs") if isinstance(shape_meta, Mapping) else None
    if not obs:
        raise ValueError("shape_meta has no 'obs' entry; list the observation keys with shape and type")
    return {key: shape for key, (shape, _) in parse_obs_meta(obs).items()}


shape_meta_action_dim = action_dim_from_shape_meta


def encoder_feature_dim(obs_encoder: nn.Module) -> int:
    """Per-frame feature size F of an encoder {key: (N, *shape)} -> (N, F), from its ``output_shape()``."""
    output_shape = getattr(obs_encoder, "output_shape", None)
    if not callable(output_shape):
        raise ValueError(
            f"obs_encoder {type(obs_encoder).__name__} has no output_shape(); "
            "the policy needs it to size the UNet"
        )
    shape = tuple(output_shape())
    if len(shape) != 1:
        raise ValueError(f"obs_encoder output_shape() is {shape}; the policy needs flat features (F,)")
    return int(shape[0])


class DiffusionUnetImagePolicy(ImageObsPolicyMixin, BaseImagePolicy):
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
        super().__init__()
        obs_shapes = shape_meta_obs_shapes(shape_meta)
        action_dim = shape_meta_action_dim(shape_meta)
        self.num_inference_steps = check_scheduler(noise_scheduler, num_inference_steps, kwargs)
        check_action_window(horizon, n_obs_steps, n_action_steps, n_obs_steps - 1)

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

        # registration order fixes the state-dict order: obs_encoder, model, mask_generator, normalizer
        self.obs_encoder = obs_encoder
        mask_generator = inpainting_mask_generator(
            action_dim, obs_feature_dim, n_obs_steps, inpaint=not obs_as_global_cond
        )
        init_denoising_state(
            self,
            model,
            noise_scheduler,
            mask_generator,
            horizon,
            action_dim,
            n_action_steps,
            n_obs_steps,
            n_obs_steps - 1,
            kwargs,
        )
        self.obs_shapes = obs_shapes
        self.obs_feature_dim = obs_feature_dim
        self.obs_as_global_cond = obs_as_global_cond

    # ---------------- inference ----------------
    @torch.no_grad()
    def predict_action(
        self, obs_dict: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """obs_dict[key]: (B, >=To, *shape) raw (images float in [0, 1]) ->
        {"action": (B, n_action_steps, Da), "action_pred": (B, horizon, Da)} raw."""
        Da, T = self.action_dim, self.horizon
        features = self._encode_for_prediction(obs_dict)
        B = features.shape[0]
        device, dtype = self.device, self.dtype
        global_cond = condition_mask = None
        if self.obs_as_global_cond:
            global_cond = features.reshape(B, -1)
            condition_data = torch.zeros(B, T, Da, device=device, dtype=dtype)
        else:
            condition_data, condition_mask = inpainting_condition(features, T, Da)

        return sample_action_chunk(self, condition_data, condition_mask, generator, global_cond=global_cond)[
            1
        ]

    # ---------------- training ----------------
    def compute_loss(self, batch: dict) -> torch.Tensor:
        """batch: {"obs": {key: (B, T, *shape)}, "action": (B, T, Da)} raw -> scalar denoising loss.

        Only the first n_obs_steps frames are normalized and encoded in the global-condition mode.
        """
        self._check_normalizer()
        nactions = self.normalizer["action"].normalize(batch["action"])
        B, T = nactions.shape[:2]
        global_cond = condition_mask = None
        if self.obs_as_global_cond:
            global_cond = self._encode(batch["obs"], self.n_obs_steps).reshape(B, -1)
            trajectory = nactions
        else:
            features = self._encode(batch["obs"], T)
            trajectory = torch.cat([nactions, features], dim=-1).detach()
            condition_mask = self.mask_generator(trajectory.shape)
        return diffusion_loss(
            self.model, self.noise_scheduler, trajectory, condition_mask, global_cond=global_cond
        )
