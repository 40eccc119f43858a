"""Diffusion Policy on low-dimensional observations (PushT keypoints + agent position) with the
time-series transformer denoiser (DP-T)."""

from __future__ import annotations

from typing import Any

import torch

from diffusion_policy.model.common.normalizer import LinearNormalizer
from diffusion_policy.model.diffusion.transformer_for_diffusion import TransformerForDiffusion
from diffusion_policy.policy.base_lowdim_policy import BaseLowdimPolicy
from diffusion_policy.policy.diffusion_sampling import (
    check_action_window,
    check_normalizer,
    check_scheduler,
    diffusion_loss,
    init_denoising_state,
    inpainting_condition,
    inpainting_mask_generator,
    online_action,
    sample_action_chunk,
)


class DiffusionTransformerLowdimPolicy(BaseLowdimPolicy):
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
        super().__init__()
        if pred_action_steps_only and not obs_as_cond:
            raise ValueError("pred_action_steps_only=True needs obs_as_cond=True")
        self.num_inference_steps = check_scheduler(noise_scheduler, num_inference_steps, kwargs)
        check_action_window(horizon, n_obs_steps, n_action_steps, n_obs_steps - 1)
        expected = {
            "input_dim": action_dim if obs_as_cond else action_dim + obs_dim,
            "output_dim": action_dim if obs_as_cond else action_dim + obs_dim,
            "cond_dim": obs_dim if obs_as_cond else 0,
            "horizon": n_action_steps if pred_action_steps_only else horizon,
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

        mask_generator = inpainting_mask_generator(action_dim, obs_dim, n_obs_steps, inpaint=not obs_as_cond)
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
        self.obs_dim = obs_dim
        self.obs_as_cond = obs_as_cond
        self.pred_action_steps_only = pred_action_steps_only

    # ---------------- inference ----------------
    @torch.no_grad()
    def predict_action(
        self, obs_dict: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """obs_dict["obs"]: (B, >=To, obs_dim) raw -> {"action": (B, n_action_steps, Da),
        "action_pred": (B, horizon, Da)} raw (plus "obs_pred" (B, horizon, Do) and
        "action_obs_pred" (B, n_action_steps, Do) when inpainting)."""
        check_normalizer(self, ("action", "obs"))
        if "past_action" in obs_dict:
            raise ValueError("obs_dict['past_action'] is not supported by DiffusionTransformerLowdimPolicy")
        obs = obs_dict["obs"]
        To, Da, Do, T = self.n_obs_steps, self.action_dim, self.obs_dim, self.horizon
        if obs.ndim != 3 or obs.shape[1] < To or obs.shape[2] != Do:
            raise ValueError(f"obs_dict['obs'] has shape {tuple(obs.shape)}; expected (B, >={To}, {Do})")
        nobs = self.normalizer["obs"].normalize(obs[:, :To])
        B = nobs.shape[0]
        cond = condition_mask = None
        if self.obs_as_cond:
            cond = nobs
            length = self.n_action_steps if self.pred_action_steps_only else T
            condition_data = torch.zeros(B, length, Da, device=self.device, dtype=self.dtype)
        else:
            condition_data, condition_mask = inpainting_condition(nobs, T, Da)

        nsample, result = sample_action_chunk(self, condition_data, condition_mask, generator, cond=cond)
        if not self.obs_as_cond:
            start, end = self.action_start, self.action_start + self.n_action_steps
            obs_pred = self.normalizer["obs"].unnormalize(nsample[..., Da:])
            result["obs_pred"] = obs_pred
            result["action_obs_pred"] = obs_pred[:, start:end]
        return result

    def reset(self) -> None:
        """Start a new episode for :meth:`select_action` (clears observation and action queues)."""
        self._queues.reset()

    @torch.no_grad()
    def select_action(self, obs: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        """One control step: obs (obs_dim,) or (B, obs_dim), or {"obs": that} -> action (Da,) or (B, Da).

        Replans every n_action_steps calls, from the last n_obs_steps observations.
        """
        if not isinstance(obs, dict):
            obs = {"obs": obs}
        return online_action(self, self._queues, obs, {"obs": (self.obs_dim,)}, generator)

    # ---------------- training ----------------
    def set_normalizer(self, normalizer: LinearNormalizer) -> None:
        """Copy the dataset's fitted normalizer (fields "obs" and "action") into the policy."""
        self.normalizer.load_state_dict(normalizer.state_dict())

    def get_optimizer(
        self, weight_decay: float, learning_rate: float, betas: tuple[float, float]
    ) -> torch.optim.Optimizer:
        """AdamW with the transformer's decay / no-decay parameter groups (the original's recipe)."""
        return self.model.configure_optimizers(
            weight_decay=weight_decay, learning_rate=learning_rate, betas=tuple(betas)
        )

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """batch: {"obs": (B, T, obs_dim), "action": (B, T, Da)} raw -> scalar denoising loss."""
        check_normalizer(self, ("action", "obs"))
        To = self.n_obs_steps
        nobs = self.normalizer["obs"].normalize(batch["obs"])
        naction = self.normalizer["action"].normalize(batch["action"])
        cond = condition_mask = None
        if self.obs_as_cond:
            cond = nobs[:, :To]
            trajectory = naction
            if self.pred_action_steps_only:
                trajectory = naction[:, self.action_start : self.action_start + self.n_action_steps]
        else:
            trajectory = torch.cat([naction, nobs], dim=-1)
            condition_mask = self.mask_generator(trajectory.shape)
        return diffusion_loss(self.model, self.noise_scheduler, trajectory, condition_mask, cond=cond)
