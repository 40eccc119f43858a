"""Diffusion Policy on low-dimensional observations (PushT keypoints + agent position) with a 1D UNet."""

from __future__ import annotations

from typing import Any

import torch

from diffusion_policy.model.common.normalizer import LinearNormalizer
from diffusion_policy.model.diffusion.conditional_unet1d import ConditionalUnet1D
from diffusion_policy.policy.base_lowdim_policy import BaseLowdimPolicy
from diffusion_policy.policy.diffusion_sampling import (
    check_action_window,
    check_normalizer,
    check_scheduler,
    check_sequence_length,
    diffusion_loss,
    init_denoising_state,
    inpainting_condition,
    inpainting_mask_generator,
    online_action,
    sample_action_chunk,
)


class DiffusionUnetLowdimPolicy(BaseLowdimPolicy):
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
        super().__init__()
        if obs_as_local_cond and obs_as_global_cond:
            raise ValueError("obs_as_local_cond and obs_as_global_cond are both True; choose one")
        if pred_action_steps_only and not obs_as_global_cond:
            raise ValueError("pred_action_steps_only=True needs obs_as_global_cond=True")
        self.num_inference_steps = check_scheduler(noise_scheduler, num_inference_steps, kwargs)
        start = n_obs_steps - 1 if oa_step_convention else n_obs_steps
        check_action_window(horizon, n_obs_steps, n_action_steps, start)
        check_sequence_length(
            model,
            n_action_steps if pred_action_steps_only else horizon,
            "n_action_steps" if pred_action_steps_only else "horizon",
        )
        self._check_model_dims(model, obs_dim, action_dim, n_obs_steps, obs_as_local_cond, obs_as_global_cond)

        inpaint = not (obs_as_local_cond or obs_as_global_cond)
        mask_generator = inpainting_mask_generator(action_dim, obs_dim, n_obs_steps, inpaint=inpaint)
        init_denoising_state(
            self,
            model,
            noise_scheduler,
            mask_generator,
            horizon,
            action_dim,
            n_action_steps,
            n_obs_steps,
            start,
            kwargs,
        )
        self.obs_dim = obs_dim
        self.obs_as_local_cond = obs_as_local_cond
        self.obs_as_global_cond = obs_as_global_cond
        self.pred_action_steps_only = pred_action_steps_only
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

    def _inpainting(self) -> bool:
        return not (self.obs_as_local_cond or self.obs_as_global_cond)

    def _check_normalizer(self) -> None:
        check_normalizer(self, ("action", "obs"))

    # ---------------- inference ----------------
    @torch.no_grad()
    def predict_action(
        self, obs_dict: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """obs_dict["obs"]: (B, >=To, obs_dim) raw -> {"action": (B, n_action_steps, Da),
        "action_pred": (B, horizon, Da)} raw (plus "obs_pred" (B, horizon, Do) and
        "action_obs_pred" (B, n_action_steps, Do) when inpainting)."""
        self._check_normalizer()
        if "past_action" in obs_dict:
            raise ValueError("obs_dict['past_action'] is not supported by DiffusionUnetLowdimPolicy")
        obs = obs_dict["obs"]
        To, Da, Do = self.n_obs_steps, self.action_dim, self.obs_dim
        if obs.ndim != 3 or obs.shape[1] < To or obs.shape[2] != Do:
            raise ValueError(f"obs_dict['obs'] has shape {tuple(obs.shape)}; expected (B, >={To}, {Do})")
        nobs = self.normalizer["obs"].normalize(obs[:, :To])
        B, T = nobs.shape[0], self.horizon
        device, dtype = self.device, self.dtype

        local_cond = global_cond = condition_mask = None
        if self.obs_as_local_cond:
            local_cond = torch.zeros(B, T, Do, device=device, dtype=dtype)
            local_cond[:, :To] = nobs
            condition_data = torch.zeros(B, T, Da, device=device, dtype=dtype)
        elif self.obs_as_global_cond:
            global_cond = nobs.reshape(B, -1)
            length = self.n_action_steps if self.pred_action_steps_only else T
            condition_data = torch.zeros(B, length, Da, device=device, dtype=dtype)
        else:
            condition_data, condition_mask = inpainting_condition(nobs, T, Da)

        nsample, result = sample_action_chunk(
            self, condition_data, condition_mask, generator, local_cond=local_cond, global_cond=global_cond
        )
        if self._inpainting():
            obs_pred = self.normalizer["obs"].unnormalize(nsample[..., Da:])
            result["obs_pred"] = obs_pred
            result["action_obs_pred"] = obs_pred[
                :, self.action_start : self.action_start + self.n_action_steps
            ]
        return result

    def reset(self) -> None:
        """Start a new episode for :meth:`select_action` (clears observation and action queues)."""
        self._queues.reset()

    @torch.no_grad()
    def select_action(self, obs: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        """One control step: obs (obs_dim,) or (B, obs_dim), or {"obs": that} -> action (Da,) or (B, Da).

        Keeps the last n_obs_steps observations (the first one repeated after reset()) and replans every
        n_action_steps calls, when the queue of planned actions runs empty.
        """
        if not isinstance(obs, dict):
            obs = {"obs": obs}
        return online_action(self, self._queues, obs, {"obs": (self.obs_dim,)}, generator)

    # ---------------- training ----------------
    def set_normalizer(self, normalizer: LinearNormalizer) -> None:
        """Copy the dataset's fitted normalizer (fields "obs" and "action") into the policy."""
        self.normalizer.load_state_dict(normalizer.state_dict())

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """batch: {"obs": (B, T, obs_dim), "action": (B, T, Da)} raw -> scalar denoising loss."""
        self._check_normalizer()
        To = self.n_obs_steps
        obs = batch["obs"]
        action = self.normalizer["action"].normalize(batch["action"])
        B = action.shape[0]
        local_cond = global_cond = condition_mask = None
        trajectory = action
        if self.obs_as_local_cond:
            local_cond = self.normalizer["obs"].normalize(obs)
            local_cond[:, To:] = 0
        elif self.obs_as_global_cond:
            global_cond = self.normalizer["obs"].normalize(obs[:, :To]).reshape(B, -1)
            if self.pred_action_steps_only:
                trajectory = action[:, self.action_start : self.action_start + self.n_action_steps]
        else:
            trajectory = torch.cat([action, self.normalizer["obs"].normalize(obs)], dim=-1)
            condition_mask = self.mask_generator(trajectory.shape)
        return diffusion_loss(
            self.model,
            self.noise_scheduler,
            trajectory,
            condition_mask,
            local_cond=local_cond,
            global_cond=global_cond,
        )
