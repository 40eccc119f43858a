"""Flow matching (rectified flow) as a drop-in for the diffusers noise schedulers the policies use.

The path between a clean normalized trajectory x0 (time 0) and Gaussian noise e (time 1) is the straight
line ``x_t = (1 - t) * x0 + t * e``; the denoiser learns its velocity ``dx_t/dt = e - x0``, and sampling
integrates the ODE from t = 1 to t = 0 in ``num_inference_steps`` equal steps. Time enters the denoiser as
``t * num_train_timesteps`` (a float), the same range as the DDPM step index, so the UNet's and the
transformer's sinusoidal step embeddings are used unchanged.

The policies see the interface of a diffusers scheduler: ``config``, ``set_timesteps``, ``timesteps``,
``step(...).prev_sample`` and ``add_noise``, plus ``sample_timesteps`` for training. Written here rather
than taken from diffusers' ``FlowMatchEulerDiscreteScheduler`` / ``FlowMatchHeunDiscreteScheduler``: their
grids end at ``1 / num_train_timesteps`` before the final jump to 0, so 2 steps are in effect one Euler step
and a negligible one, Heun takes no custom grid, there is no midpoint solver, and neither samples training
times (uniform / Beta / logit-normal).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from diffusion_policy.common.flow_ode import SOLVER_EVALUATIONS, FlowODE

TIME_SAMPLINGS = ("uniform", "beta", "logit_normal")
SOLVERS = tuple(SOLVER_EVALUATIONS)
# denoiser evaluations per ODE step
PREDICTION_TYPE = "flow"
DEFAULT_INFERENCE_STEPS = 10
# options of the DDPM/DDIM schedulers that mean nothing for a straight-line flow; named in the error
DIFFUSION_ONLY = (
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "variance_type",
    "set_alpha_to_one",
    "steps_offset",
    "thresholding",
    "dynamic_thresholding_ratio",
    "sample_max_value",
    "timestep_spacing",
    "rescale_betas_zero_snr",
)


class FlowMatchingScheduler(SchedulerMixin, ConfigMixin):
    """Rectified-flow objective and ODE sampler (Euler, midpoint or Heun) on a uniform time grid.

    Args:
        num_train_timesteps: scale of the time fed to the denoiser (``t * num_train_timesteps``).
        time_sampling: training-time distribution of t: ``uniform`` on (0, 1); ``beta`` (the pi0 action
            expert's: ``t = (1 - s) + s * Beta(beta_alpha, beta_beta)`` with ``s = time_max``, which favours
            noisy times); ``logit_normal`` (``t = sigmoid(N(logit_mean, logit_std))``, rectified-flow
            transformers' choice, favours middle times).
        solver: ``euler`` (1 denoiser call per step), ``midpoint`` or ``heun`` (2 calls per step).
        clip_sample: clamp the final sample to ``[-clip_sample_range, clip_sample_range]``, the range the
            normalizer maps the data to (DDPM's ``clip_sample`` clamps its x0 estimates the same way); an
            undertrained flow can otherwise leave the action range.
        prediction_type: must be ``"flow"`` (the network predicts the velocity ``noise - sample``).
    """

    config_name = "scheduler_config.json"
    order = 1

    def __init__(
        self,
        num_train_timesteps: int = 100,
        time_sampling: str = "uniform",
        beta_alpha: float = 1.5,
        beta_beta: float = 1.0,
        time_max: float = 0.999,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        solver: str = "euler",
        clip_sample: bool = True,
        clip_sample_range: float = 1.0,
        prediction_type: str = PREDICTION_TYPE,
        **unsupported: Any,
    ) -> None:
        name = type(self).__name__
        if unsupported:
            ddpm = sorted(k for k in unsupported if k in DIFFUSION_ONLY)
            other = sorted(k for k in unsupported if k not in DIFFUSION_ONLY)
            what = f"DDPM/DDIM-only option(s) {ddpm}" if ddpm else f"unknown option(s) {other}"
            raise ValueError(
                f"{name} does not take {what}: flow matching has no beta schedule, variance or clipping; "
                "remove them (or use policy/noise_scheduler=ddpm)"
            )
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"{name} time_sampling={time_sampling!r} is not one of {list(TIME_SAMPLINGS)}")
        if solver not in SOLVERS:
            raise ValueError(f"{name} solver={solver!r} is not one of {list(SOLVERS)}")
        if prediction_type != PREDICTION_TYPE:
            raise ValueError(
                f"{name} prediction_type={prediction_type!r}: flow matching predicts the velocity; "
                f"use {PREDICTION_TYPE!r}"
            )
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int):
            raise ValueError(f"{name} num_train_timesteps={num_train_timesteps!r} must be an integer >= 1")
        if num_train_timesteps < 1:
            raise ValueError(f"{name} num_train_timesteps={num_train_timesteps} must be >= 1")
        for key, value in (("beta_alpha", beta_alpha), ("beta_beta", beta_beta), ("logit_std", logit_std)):
            if not float(value) > 0:
                raise ValueError(f"{name} {key}={value} must be > 0")
        if not float(clip_sample_range) > 0:
            raise ValueError(f"{name} clip_sample_range={clip_sample_range} must be > 0")
        if not 0 < float(time_max) <= 1:
            raise ValueError(f"{name} time_max={time_max} must be in (0, 1]")
        self.register_to_config(
            num_train_timesteps=int(num_train_timesteps),
            time_sampling=time_sampling,
            beta_alpha=float(beta_alpha),
            beta_beta=float(beta_beta),
            time_max=float(time_max),
            logit_mean=float(logit_mean),
            logit_std=float(logit_std),
            solver=solver,
            clip_sample=bool(clip_sample),
            clip_sample_range=float(clip_sample_range),
            prediction_type=prediction_type,
        )
        self.set_timesteps(DEFAULT_INFERENCE_STEPS)

    # ---------------- training ----------------
    def sample_timesteps(self, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Training times for a batch, in denoiser units: (batch,) float32 in [0, num_train_timesteps]."""
        cfg = self.config
        if cfg.time_sampling == "uniform":
            t = torch.rand(batch, device=device)
        elif cfg.time_sampling == "beta":
            beta = torch.distributions.Beta(
                torch.tensor(cfg.beta_alpha, device=device), torch.tensor(cfg.beta_beta, device=device)
            )
            t = (1 - cfg.time_max) + cfg.time_max * beta.sample((batch,))
        else:
            t = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(batch, device=device))
        return t * cfg.num_train_timesteps

    def _time(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(timesteps, device=like.device, dtype=like.dtype) / self.config.num_train_timesteps
        return t.reshape(-1, *([1] * (like.ndim - 1)))

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Point on the straight path: original, noise (B, ...), timesteps (B,) denoiser units -> x_t."""
        t = self._time(timesteps, original)
        return (1 - t) * original + t * noise

    def get_velocity(
        self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """The regression target: the path's velocity ``noise - sample`` (independent of the time)."""
        return noise - sample

    # ---------------- sampling ----------------
    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """Grid t_i = 1 - i / N; ``timesteps`` lists the denoiser's evaluation times (denoiser units) in the
        order :meth:`step` expects them: N for Euler, 2N for midpoint and Heun."""
        clip = self.config.clip_sample_range if self.config.clip_sample else None
        self._ode = FlowODE(self.config.solver, num_inference_steps, clip)
        self.num_inference_steps = self._ode.num_steps
        self.grid = self._ode.grid
        n_train = self.config.num_train_timesteps
        self.timesteps = torch.tensor(
            [t * n_train for t in self._ode.times], dtype=torch.float32, device=device
        )
        self._stage = 0

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[torch.Tensor]:
        """One denoiser evaluation's update (:class:`FlowODE`). model_output: velocity at (sample, timestep),
        (B, T, D) -> ``prev_sample``: the state at the next evaluation time (the next grid point after a
        full step).

        Called once per entry of ``timesteps``, in order; ``generator`` is accepted for interface parity and
        unused (the ODE is deterministic given the initial noise)."""
        if self._stage >= self._ode.num_evaluations:
            raise RuntimeError(
                "step() called more often than timesteps has entries; call set_timesteps first"
            )
        prev = self._ode.step(self._stage, model_output, sample)
        self._stage += 1
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

    def __len__(self) -> int:
        return self.config.num_train_timesteps


def is_flow_matching(scheduler: Any) -> bool:
    return isinstance(scheduler, FlowMatchingScheduler)
