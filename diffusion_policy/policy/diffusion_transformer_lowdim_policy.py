"""Diffusion Policy on low-dimensional observations (PushT keypoints + agent position) with the
time-series transformer denoiser (DP-T)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from diffusion_policy.model.diffusion.transformer_for_diffusion import TransformerForDiffusion
from diffusion_policy.policy.action_window import ActionWindow
from diffusion_policy.policy.denoising import inpainting_condition
from diffusion_policy.policy.diffusion_policy_base import Inputs, LowdimDiffusionPolicy


class DiffusionTransformerLowdimPolicy(LowdimDiffusionPolicy):
    """Predicts a horizon of actions by denoising with a ``TransformerForDiffusion``.

    - ``obs_as_cond`` (PushT): the To normalized observations are the transformer's condition tokens
      (B, To, obs_dim); the model denoises actions only (``model.input_dim == action_dim``,
      ``model.cond_dim == obs_dim``).
    - otherwise: inpainting; the model denoises [action, obs] and the first To obs are held fixed.

    Executed actions are ``action_pred[:, n_obs_steps - 1 : n_obs_steps - 1 + n_action_steps]`` (with
    ``pred_action_steps_only`` only those steps are predicted). Extra keyword arguments are passed to
    ``noise_scheduler.step`` (e.g. ``eta`` for DDIM).
    """

    def __init__(
        self,
        model: TransformerForDiffusion,
        noise_scheduler: Any,
        horizon: int,
        obs_dim: int,
        action_dim: int,
        n_action_steps: int,
        n_obs_steps: int,
        num_inference_steps: int | None = None,
        obs_as_cond: bool = False,
        pred_action_steps_only: bool = False,
        **kwargs,
    ) -> None:
        if pred_action_steps_only and not obs_as_cond:
            raise ValueError("pred_action_steps_only=True needs obs_as_cond=True")
        window = ActionWindow(horizon, n_obs_steps, n_action_steps, action_dim, True, pred_action_steps_only)
        inpaint_dim = 0 if obs_as_cond else obs_dim
        super().__init__(obs_dim, model, noise_scheduler, window, num_inference_steps, kwargs, inpaint_dim)
        expected = {
            "input_dim": action_dim if obs_as_cond else action_dim + obs_dim,
            "output_dim": action_dim if obs_as_cond else action_dim + obs_dim,
            "cond_dim": obs_dim if obs_as_cond else 0,
            "horizon": window.sample_length,
        }
        for name, want in expected.items():
            got = getattr(model, name, want)
            if got != want:
                raise ValueError(
                    f"model {name}={got} does not match this policy (expected {want} from obs_dim={obs_dim}, "
                    f"action_dim={action_dim}, horizon={horizon}, n_action_steps={n_action_steps}, "
                    f"obs_as_cond={obs_as_cond}, pred_action_steps_only={pred_action_steps_only})"
                )
        if obs_as_cond and getattr(model, "n_obs_steps", n_obs_steps) < n_obs_steps:
            raise ValueError(
                f"model n_obs_steps={model.n_obs_steps} has fewer condition tokens than the policy's "
                f"n_obs_steps={n_obs_steps}"
            )
        self.obs_as_cond = obs_as_cond

    def prediction_inputs(self, obs_dict: Mapping[str, torch.Tensor]) -> Inputs:
        """obs_dict["obs"]: (B, >=To, Do) raw -> condition tokens, or the inpainting condition."""
        nobs = self.normalized_obs(obs_dict)
        if self.obs_as_cond:
            shape = (nobs.shape[0], self.window.sample_length, self.action_dim)
            return torch.zeros(shape, device=self.device, dtype=self.dtype), None, {"cond": nobs}
        data, mask = inpainting_condition(nobs, self.horizon, self.action_dim)
        return data, mask, {}

    def training_inputs(self, batch: Mapping[str, torch.Tensor]) -> Inputs:
        """batch: {"obs": (B, T, Do), "action": (B, T, Da)} raw."""
        nobs = self.normalizer["obs"].normalize(batch["obs"])
        naction = self.normalizer["action"].normalize(batch["action"])
        if self.obs_as_cond:
            trajectory = self._executed(naction) if self.pred_action_steps_only else naction
            return trajectory, None, {"cond": nobs[:, : self.n_obs_steps]}
        trajectory = torch.cat([naction, nobs], dim=-1)
        return trajectory, self.mask_generator(trajectory.shape), {}

    def get_optimizer(
        self, weight_decay: float, learning_rate: float, betas: tuple[float, float]
    ) -> torch.optim.Optimizer:
        """AdamW with the transformer's decay / no-decay parameter groups (the original's recipe)."""
        return self.model.configure_optimizers(
            weight_decay=weight_decay, learning_rate=learning_rate, betas=tuple(betas)
        )
