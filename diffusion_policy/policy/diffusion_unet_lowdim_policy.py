"""Diffusion Policy on low-dimensional observations (PushT keypoints + agent position) with a 1D UNet."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from diffusion_policy.model.diffusion.conditional_unet1d import ConditionalUnet1D
from diffusion_policy.policy.action_window import ActionWindow
from diffusion_policy.policy.denoising import inpainting_condition
from diffusion_policy.policy.diffusion_policy_base import Inputs, LowdimDiffusionPolicy
from diffusion_policy.policy.shape_checks import check_sequence_length


class DiffusionUnetLowdimPolicy(LowdimDiffusionPolicy):
    """Predicts a horizon of actions by denoising, conditioned on the last ``n_obs_steps`` observations.

    Observation modes (at most one of the two flags):
    - ``obs_as_global_cond`` (PushT default): the To observations, flattened time-major, are a global
      condition; the UNet denoises actions only (``model.input_dim == action_dim``,
      ``model.global_cond_dim == obs_dim * n_obs_steps``).
    - ``obs_as_local_cond``: the observations are per-step conditions for the first To steps.
    - neither: inpainting; the UNet denoises [action, obs] and the first To obs are held fixed.

    The predicted window's index 0 is the oldest observation; executed actions start at index
    ``n_obs_steps - 1`` with ``oa_step_convention`` (the PushT configs) and at ``n_obs_steps`` without.
    Extra keyword arguments are passed to ``noise_scheduler.step`` (e.g. ``eta`` for DDIM).
    """

    def __init__(
        self,
        model: ConditionalUnet1D,
        noise_scheduler: Any,
        horizon: int,
        obs_dim: int,
        action_dim: int,
        n_action_steps: int,
        n_obs_steps: int,
        num_inference_steps: int | None = None,
        obs_as_local_cond: bool = False,
        obs_as_global_cond: bool = False,
        pred_action_steps_only: bool = False,
        oa_step_convention: bool = False,
        **kwargs,
    ) -> None:
        if obs_as_local_cond and obs_as_global_cond:
            raise ValueError("obs_as_local_cond and obs_as_global_cond are both True; choose one")
        if pred_action_steps_only and not obs_as_global_cond:
            raise ValueError("pred_action_steps_only=True needs obs_as_global_cond=True")
        inpaint = not (obs_as_local_cond or obs_as_global_cond)
        window = ActionWindow(
            horizon, n_obs_steps, n_action_steps, action_dim, oa_step_convention, pred_action_steps_only
        )
        inpaint_dim = obs_dim if inpaint else 0
        super().__init__(obs_dim, model, noise_scheduler, window, num_inference_steps, kwargs, inpaint_dim)
        what = "n_action_steps" if pred_action_steps_only else "horizon"
        check_sequence_length(model, window.sample_length, what)
        self._check_model_dims(model, obs_dim, action_dim, n_obs_steps, obs_as_local_cond, obs_as_global_cond)
        self.obs_as_local_cond = obs_as_local_cond
        self.obs_as_global_cond = obs_as_global_cond
        self.oa_step_convention = oa_step_convention

    @staticmethod
    def _check_model_dims(model, obs_dim, action_dim, n_obs_steps, local, global_) -> None:
        expected = {
            "input_dim": action_dim if (local or global_) else action_dim + obs_dim,
            "global_cond_dim": obs_dim * n_obs_steps if global_ else None,
            "local_cond_dim": obs_dim if local else None,
        }
        for name, want in expected.items():
            if not hasattr(model, name):
                continue
            got = getattr(model, name)
            if got != want:
                raise ValueError(
                    f"model {name}={got} does not match this policy's observation mode (expected {want} from "
                    f"obs_dim={obs_dim}, action_dim={action_dim}, n_obs_steps={n_obs_steps}, "
                    f"obs_as_local_cond={local}, obs_as_global_cond={global_})"
                )

    def prediction_inputs(self, obs_dict: Mapping[str, torch.Tensor]) -> Inputs:
        """obs_dict["obs"]: (B, >=To, Do) raw -> the UNet's condition (see the class docstring)."""
        nobs = self.normalized_obs(obs_dict)
        B, To, Do = nobs.shape
        shape = (B, self.window.sample_length, self.action_dim)
        device, dtype = self.device, self.dtype
        if self.obs_as_local_cond:
            local_cond = torch.zeros(B, self.horizon, Do, device=device, dtype=dtype)
            local_cond[:, :To] = nobs
            return torch.zeros(shape, device=device, dtype=dtype), None, {"local_cond": local_cond}
        if self.obs_as_global_cond:
            global_cond = nobs.reshape(B, -1)
            return torch.zeros(shape, device=device, dtype=dtype), None, {"global_cond": global_cond}
        data, mask = inpainting_condition(nobs, self.horizon, self.action_dim)
        return data, mask, {}

    def training_inputs(self, batch: Mapping[str, torch.Tensor]) -> Inputs:
        """batch: {"obs": (B, T, Do), "action": (B, T, Da)} raw."""
        To = self.n_obs_steps
        obs = batch["obs"]
        action = self.normalizer["action"].normalize(batch["action"])
        B = action.shape[0]
        if self.obs_as_local_cond:
            local_cond = self.normalizer["obs"].normalize(obs)
            local_cond[:, To:] = 0
            return action, None, {"local_cond": local_cond}
        if self.obs_as_global_cond:
            global_cond = self.normalizer["obs"].normalize(obs[:, :To]).reshape(B, -1)
            trajectory = self._executed(action) if self.pred_action_steps_only else action
            return trajectory, None, {"global_cond": global_cond}
        trajectory = torch.cat([action, self.normalizer["obs"].normalize(obs)], dim=-1)
        return trajectory, self.mask_generator(trajectory.shape), {}
