"""Diffusion Policy on image + low-dim observations with the robomimic-style ResNet-18 encoder and the
time-series transformer denoiser (DP-T, "hybrid")."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from diffusion_policy.model.diffusion.transformer_for_diffusion import TransformerForDiffusion
from diffusion_policy.policy.action_window import ActionWindow
from diffusion_policy.policy.denoising import inpainting_condition
from diffusion_policy.policy.diffusion_policy_base import ImageDiffusionPolicy, Inputs
from diffusion_policy.policy.diffusion_unet_hybrid_image_policy import hybrid_obs_encoder
from diffusion_policy.policy.shape_checks import action_dim_from_shape_meta, shape_meta_obs_shapes


class DiffusionTransformerHybridImagePolicy(ImageDiffusionPolicy):
    """Encodes each of the last ``n_obs_steps`` observation frames (``shape_meta["obs"]``: rgb and low_dim
    keys; 66 features per frame for PushT) and denoises a ``horizon`` of actions with a
    ``TransformerForDiffusion`` built here.

    With ``obs_as_cond`` (the default, and the PushT config) the To per-frame features are the
    transformer's condition tokens (B, To, F); otherwise the model inpaints [action, features].
    Executed actions are ``action_pred[:, n_obs_steps - 1 : n_obs_steps - 1 + n_action_steps]``.
    ``crop_shape``, ``obs_encoder_group_norm``, ``obs_encoder_backbone_width`` and ``eval_fixed_crop``
    configure the encoder as in
    ``DiffusionUnetHybridImagePolicy``; ``n_layer`` ... ``n_cond_layers`` the transformer. Extra keyword
    arguments are passed to ``noise_scheduler.step``.
    """

    def __init__(
        self,
        shape_meta: Mapping,
        noise_scheduler: Any,
        horizon: int,
        n_action_steps: int,
        n_obs_steps: int,
        num_inference_steps: int | None = None,
        crop_shape: Sequence[int] | None = (76, 76),
        obs_encoder_group_norm: bool = False,
        obs_encoder_backbone_width: int = 64,
        eval_fixed_crop: bool = False,
        n_layer: int = 8,
        n_cond_layers: int = 0,
        n_head: int = 4,
        n_emb: int = 256,
        p_drop_emb: float = 0.0,
        p_drop_attn: float = 0.3,
        causal_attn: bool = True,
        time_as_cond: bool = True,
        obs_as_cond: bool = True,
        pred_action_steps_only: bool = False,
        **kwargs,
    ) -> None:
        if pred_action_steps_only and not obs_as_cond:
            raise ValueError("pred_action_steps_only=True needs obs_as_cond=True")
        obs_encoder = hybrid_obs_encoder(
            shape_meta, crop_shape, obs_encoder_group_norm, eval_fixed_crop, obs_encoder_backbone_width
        )
        obs_shapes = shape_meta_obs_shapes(shape_meta)
        action_dim = action_dim_from_shape_meta(shape_meta)
        obs_feature_dim = obs_encoder.output_dim
        input_dim = action_dim if obs_as_cond else action_dim + obs_feature_dim
        model = TransformerForDiffusion(
            input_dim=input_dim,
            output_dim=input_dim,
            horizon=n_action_steps if pred_action_steps_only else horizon,
            n_obs_steps=n_obs_steps,
            cond_dim=obs_feature_dim if obs_as_cond else 0,
            n_layer=n_layer,
            n_head=n_head,
            n_emb=n_emb,
            p_drop_emb=p_drop_emb,
            p_drop_attn=p_drop_attn,
            causal_attn=causal_attn,
            time_as_cond=time_as_cond,
            obs_as_cond=obs_as_cond,
            n_cond_layers=n_cond_layers,
        )
        window = ActionWindow(horizon, n_obs_steps, n_action_steps, action_dim, True, pred_action_steps_only)
        inpaint_dim = 0 if obs_as_cond else obs_feature_dim
        super().__init__(
            model, noise_scheduler, window, obs_shapes, num_inference_steps, kwargs, inpaint_dim, obs_encoder
        )
        self.obs_feature_dim = obs_feature_dim
        self.obs_as_cond = obs_as_cond

    def prediction_inputs(self, obs_dict: Mapping[str, torch.Tensor]) -> Inputs:
        """obs_dict[key]: (B, >=To, *shape) raw (images float in [0, 1]) -> condition tokens (B, To, F), or
        the inpainting condition."""
        features = self.encode(obs_dict, self.n_obs_steps)
        if self.obs_as_cond:
            shape = (features.shape[0], self.window.sample_length, self.action_dim)
            return torch.zeros(shape, device=self.device, dtype=self.dtype), None, {"cond": features}
        data, mask = inpainting_condition(features, self.horizon, self.action_dim)
        return data, mask, {}

    def training_inputs(self, batch: Mapping[str, Any]) -> Inputs:
        """batch: {"obs": {key: (B, T, *shape)}, "action": (B, T, Da)} raw. With ``obs_as_cond`` only the
        first n_obs_steps frames are normalized and encoded."""
        nactions = self.normalizer["action"].normalize(batch["action"])
        if self.obs_as_cond:
            trajectory = self._executed(nactions) if self.pred_action_steps_only else nactions
            return trajectory, None, {"cond": self.encode(batch["obs"], self.n_obs_steps)}
        features = self.encode(batch["obs"], nactions.shape[1])
        trajectory = torch.cat([nactions, features], dim=-1).detach()
        return trajectory, self.mask_generator(trajectory.shape), {}

    def get_optimizer(
        self,
        transformer_weight_decay: float,
        obs_encoder_weight_decay: float,
        learning_rate: float,
        betas: tuple[float, float],
    ) -> torch.optim.Optimizer:
        """AdamW: the transformer's decay / no-decay groups plus the obs encoder with its own decay."""
        groups = self.model.get_optim_groups(weight_decay=transformer_weight_decay)
        groups.append(
            {"params": list(self.obs_encoder.parameters()), "weight_decay": obs_encoder_weight_decay}
        )
        return torch.optim.AdamW(groups, lr=learning_rate, betas=tuple(betas))
