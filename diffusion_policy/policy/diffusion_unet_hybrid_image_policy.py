"""Diffusion Policy on image + low-dim observations: ResNet-18 keypoint encoder + 1D UNet ("hybrid")."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from diffusion_policy.model.common.normalizer import LinearNormalizer
from diffusion_policy.model.diffusion.conditional_unet1d import ConditionalUnet1D
from diffusion_policy.model.diffusion.mask_generator import LowdimMaskGenerator
from diffusion_policy.model.vision.robomimic_style_obs_encoder import RobomimicStyleObsEncoder
from diffusion_policy.policy.base_image_policy import BaseImagePolicy
from diffusion_policy.policy.diffusion_sampling import (
    NORMALIZER_HINT,
    OnlineQueues,
    check_action_window,
    check_scheduler,
    check_sequence_length,
    conditional_sample,
    diffusion_loss,
    encode_observations,
    to_single_step_batch,
)


def _action_dim(shape_meta: Mapping) -> int:
    if "action" not in shape_meta or "shape" not in shape_meta["action"]:
        raise ValueError("shape_meta has no action shape; add e.g. action: {shape: [2]}")
    shape = list(shape_meta["action"]["shape"])
    if len(shape) != 1:
        raise ValueError(f"shape_meta action shape {shape} must be 1-D, e.g. [2]")
    return int(shape[0])


class DiffusionUnetHybridImagePolicy(BaseImagePolicy):
    """Encodes the last ``n_obs_steps`` observation frames (``shape_meta["obs"]``: rgb and low_dim keys)
    and denoises a ``horizon`` of actions with a ConditionalUnet1D built here.

    With ``obs_as_global_cond`` (the default, and the PushT configs) the To per-frame features
    (66 each for PushT) are one global condition; otherwise the UNet inpaints [action, features].
    Executed actions are ``action_pred[:, n_obs_steps - 1 : n_obs_steps - 1 + n_action_steps]``.
    ``crop_shape`` random-crops rgb inputs in training (center crop in eval with ``eval_fixed_crop``);
    ``obs_encoder_group_norm`` swaps the encoder's BatchNorm for GroupNorm (needed with EMA).
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
        eval_fixed_crop: bool = False,
        **kwargs,
    ) -> None:
        super().__init__()
        if "obs" not in shape_meta:
            raise ValueError("shape_meta has no 'obs' entry; list the observation keys with shape and type")
        action_dim = _action_dim(shape_meta)
        self.num_inference_steps = check_scheduler(noise_scheduler, num_inference_steps, kwargs)
        check_action_window(horizon, n_obs_steps, n_action_steps, n_obs_steps - 1)

        obs_encoder = RobomimicStyleObsEncoder(
            shape_meta["obs"],
            crop_shape=crop_shape,
            use_group_norm=obs_encoder_group_norm,
            eval_fixed_crop=eval_fixed_crop,
        )
        obs_feature_dim = obs_encoder.output_dim
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

        self.obs_encoder = obs_encoder
        self.model = model
        self.noise_scheduler = noise_scheduler
        self.mask_generator = LowdimMaskGenerator(
            action_dim=action_dim,
            obs_dim=0 if obs_as_global_cond else obs_feature_dim,
            max_n_obs_steps=n_obs_steps,
            fix_obs_steps=True,
            action_visible=False,
        )
        self.normalizer = LinearNormalizer()
        self.obs_shapes = dict(obs_encoder.obs_shapes)
        self.horizon = horizon
        self.obs_feature_dim = obs_feature_dim
        self.action_dim = action_dim
        self.n_action_steps = n_action_steps
        self.n_obs_steps = n_obs_steps
        self.obs_as_global_cond = obs_as_global_cond
        self.kwargs = kwargs
        self._queues = OnlineQueues(n_obs_steps)

    def _check_normalizer(self) -> None:
        missing = [k for k in ("action", *self.obs_shapes) if k not in self.normalizer]
        if missing:
            raise RuntimeError(f"{type(self).__name__} normalizer lacks {missing}; {NORMALIZER_HINT}")

    def _encode(self, obs: Mapping[str, torch.Tensor], n_steps: int) -> torch.Tensor:
        """Raw obs {key: (B, >=n_steps, *shape)} -> normalized features (B, n_steps, obs_feature_dim)."""
        return encode_observations(self.obs_encoder, self.normalizer, self.obs_shapes, obs, n_steps)

    # ---------------- inference ----------------
    @torch.no_grad()
    def predict_action(
        self, obs_dict: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """obs_dict[key]: (B, >=To, *shape) raw (images float in [0, 1]) ->
        {"action": (B, n_action_steps, Da), "action_pred": (B, horizon, Da)} raw."""
        self._check_normalizer()
        if "past_action" in obs_dict:
            raise ValueError("obs_dict['past_action'] is not supported by DiffusionUnetHybridImagePolicy")
        To, Da, T = self.n_obs_steps, self.action_dim, self.horizon
        features = self._encode(obs_dict, To)
        B = features.shape[0]
        device, dtype = self.device, self.dtype
        global_cond = condition_mask = None
        if self.obs_as_global_cond:
            global_cond = features.reshape(B, -1)
            condition_data = torch.zeros(B, T, Da, device=device, dtype=dtype)
        else:
            condition_data = torch.zeros(B, T, Da + self.obs_feature_dim, device=device, dtype=dtype)
            condition_data[:, :To, Da:] = features
            condition_mask = torch.zeros_like(condition_data, dtype=torch.bool)
            condition_mask[:, :To, Da:] = True

        nsample = conditional_sample(
            self.model,
            self.noise_scheduler,
            self.num_inference_steps,
            condition_data,
            condition_mask,
            global_cond=global_cond,
            generator=generator,
            **self.kwargs,
        )
        action_pred = self.normalizer["action"].unnormalize(nsample[..., :Da])
        start = To - 1
        return {"action": action_pred[:, start : start + self.n_action_steps], "action_pred": action_pred}

    def reset(self) -> None:
        """Start a new episode for :meth:`select_action` (clears observation and action queues)."""
        self._queues.reset()

    @torch.no_grad()
    def select_action(self, obs: Mapping[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        """One control step: obs[key] (*shape) or (B, *shape), as the PushT image env returns ->
        action (Da,) or (B, Da).

        Keeps the last n_obs_steps observations (the first one repeated after reset()) and replans every
        n_action_steps calls, when the queue of planned actions runs empty.
        """
        step_obs, batched = to_single_step_batch(obs, self.obs_shapes, self.device, self.dtype)
        action = self._queues.next_action(
            step_obs, lambda stacked: self.predict_action(stacked, generator=generator)["action"]
        )
        return action if batched else action[0]

    # ---------------- training ----------------
    def set_normalizer(self, normalizer: LinearNormalizer) -> None:
        """Copy the dataset's fitted normalizer (action and every obs key) into the policy."""
        self.normalizer.load_state_dict(normalizer.state_dict())

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
