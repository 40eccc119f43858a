"""Diffusion Policy on image + low-dim observations with the robomimic-style ResNet-18 encoder and the
time-series transformer denoiser (DP-T, "hybrid")."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from diffusion_policy.model.diffusion.transformer_for_diffusion import TransformerForDiffusion
from diffusion_policy.model.vision.robomimic_style_obs_encoder import RobomimicStyleObsEncoder
from diffusion_policy.policy.base_image_policy import BaseImagePolicy
from diffusion_policy.policy.diffusion_sampling import (
    ImageObsPolicyMixin,
    action_dim_from_shape_meta,
    check_action_window,
    check_scheduler,
    diffusion_loss,
    init_denoising_state,
    inpainting_condition,
    inpainting_mask_generator,
    sample_action_chunk,
)


class DiffusionTransformerHybridImagePolicy(ImageObsPolicyMixin, BaseImagePolicy):
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
        super().__init__()
        if "obs" not in shape_meta:
            raise ValueError("shape_meta has no 'obs' entry; list the observation keys with shape and type")
        if pred_action_steps_only and not obs_as_cond:
            raise ValueError("pred_action_steps_only=True needs obs_as_cond=True")
        action_dim = action_dim_from_shape_meta(shape_meta)
        self.num_inference_steps = check_scheduler(noise_scheduler, num_inference_steps, kwargs)
        check_action_window(horizon, n_obs_steps, n_action_steps, n_obs_steps - 1)

        obs_encoder = RobomimicStyleObsEncoder(
            shape_meta["obs"],
            crop_shape=crop_shape,
            use_group_norm=obs_encoder_group_norm,
            eval_fixed_crop=eval_fixed_crop,
            backbone_width=obs_encoder_backbone_width,
        )
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

        self.obs_encoder = obs_encoder
        mask_generator = inpainting_mask_generator(
            action_dim, obs_feature_dim, n_obs_steps, inpaint=not obs_as_cond
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
        self.obs_shapes = dict(obs_encoder.obs_shapes)
        self.obs_feature_dim = obs_feature_dim
        self.obs_as_cond = obs_as_cond
        self.pred_action_steps_only = pred_action_steps_only

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
        cond = condition_mask = None
        if self.obs_as_cond:
            cond = features
            length = self.n_action_steps if self.pred_action_steps_only else T
            condition_data = torch.zeros(B, length, Da, device=self.device, dtype=self.dtype)
        else:
            condition_data, condition_mask = inpainting_condition(features, T, Da)
        return sample_action_chunk(self, condition_data, condition_mask, generator, cond=cond)[1]

    # ---------------- training ----------------
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

    def compute_loss(self, batch: dict) -> torch.Tensor:
        """batch: {"obs": {key: (B, T, *shape)}, "action": (B, T, Da)} raw -> scalar denoising loss.

        With ``obs_as_cond`` only the first n_obs_steps frames are normalized and encoded.
        """
        self._check_normalizer()
        nactions = self.normalizer["action"].normalize(batch["action"])
        T = nactions.shape[1]
        cond = condition_mask = None
        if self.obs_as_cond:
            cond = self._encode(batch["obs"], self.n_obs_steps)
            trajectory = nactions
            if self.pred_action_steps_only:
                trajectory = nactions[:, self.action_start : self.action_start + self.n_action_steps]
        else:
            features = self._encode(batch["obs"], T)
            trajectory = torch.cat([nactions, features], dim=-1).detach()
            condition_mask = self.mask_generator(trajectory.shape)
        return diffusion_loss(self.model, self.noise_scheduler, trajectory, condition_mask, cond=cond)
