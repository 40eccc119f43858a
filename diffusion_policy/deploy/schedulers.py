"""DDIM and DDPM sampling steps in numpy, following diffusers' ``DDIMScheduler`` / ``DDPMScheduler`` for the
settings the policies use (tests compare them step by step with diffusers), and the flow-matching ODE
solvers of :class:`diffusion_policy.model.diffusion.flow_matching.FlowMatchingScheduler`.

Supported: beta schedules ``linear``, ``scaled_linear``, ``squaredcos_cap_v2`` (or ``trained_betas``);
timestep spacings ``leading``, ``trailing``, ``linspace``; predictions ``epsilon`` and ``sample``;
``clip_sample``; DDIM with any ``eta`` (``set_alpha_to_one``); DDPM with ``fixed_small`` or ``fixed_large``
variance. Anything else raises ValueError naming the setting.

Every per-step coefficient is computed once in ``set_timesteps``, so a step is a few fused array operations.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

PREDICTIONS = ("epsilon", "sample")


def make_betas(config: Mapping[str, Any]) -> np.ndarray:
    """Betas of the training schedule (float64), as diffusers builds them (it computes them in float32)."""
    n = int(config["num_train_timesteps"])
    trained = config.get("trained_betas")
    kind = config.get("beta_schedule", "linear")
    if trained is not None:
        betas = np.asarray(trained, dtype=np.float32)
    elif kind == "linear":
        betas = np.linspace(config["beta_start"], config["beta_end"], n, dtype=np.float32)
    elif kind == "scaled_linear":
        betas = np.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, n, dtype=np.float32) ** 2
    elif kind == "squaredcos_cap_v2":

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = np.array(
            [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], dtype=np.float32
        )
    else:
        raise ValueError(f"beta_schedule={kind!r} is not supported by the numpy sampler")
    if config.get("rescale_betas_zero_snr"):
        raise ValueError("rescale_betas_zero_snr=True is not supported by the numpy sampler")
    return betas


def alphas_cumprod(config: Mapping[str, Any]) -> np.ndarray:
    """Cumulative product of (1 - beta), accumulated in float32 like diffusers' torch.cumprod."""
    return np.cumprod(1.0 - make_betas(config), dtype=np.float32)


def inference_timesteps(config: Mapping[str, Any], num_inference_steps: int) -> np.ndarray:
    """The descending timesteps ``set_timesteps(num_inference_steps)`` picks, int64."""
    n = int(config["num_train_timesteps"])
    if not 1 <= num_inference_steps <= n:
        raise ValueError(f"num_inference_steps={num_inference_steps} must be in [1, {n}]")
    spacing = config.get("timestep_spacing", "leading")
    if spacing == "linspace":
        return np.linspace(0, n - 1, num_inference_steps).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = n // num_inference_steps
        steps = (np.arange(0, num_inference_steps) * ratio).round()[::-1].copy().astype(np.int64)
        return steps + int(config.get("steps_offset", 0))
    if spacing == "trailing":
        return np.round(np.arange(n, 0, -n / num_inference_steps)).astype(np.int64) - 1
    raise ValueError(f"timestep_spacing={spacing!r} is not supported by the numpy sampler")


def _check_common(config: Mapping[str, Any]) -> None:
    if config.get("prediction_type", "epsilon") not in PREDICTIONS:
        raise ValueError(
            f"prediction_type={config.get('prediction_type')!r} is not supported; use {PREDICTIONS}"
        )
    if config.get("thresholding"):
        raise ValueError("thresholding=True is not supported by the numpy sampler")


class NumpySampler:
    """Shared by DDIM and DDPM: per-step coefficients ``x0 = a * x + b * out`` (epsilon) or ``x0 = out``
    (sample), then ``prev = c * x0 + d * x (+ e * eps) + sigma * noise``."""

    stochastic = False

    def __init__(self, config: Mapping[str, Any], num_inference_steps: int) -> None:
        _check_common(config)
        self.config = dict(config)
        self.alphas_cumprod = alphas_cumprod(config)
        self.prediction_type = config.get("prediction_type", "epsilon")
        self.clip = float(config.get("clip_sample_range", 1.0)) if config.get("clip_sample", True) else None
        self.set_timesteps(num_inference_steps)

    def set_timesteps(self, num_inference_steps: int) -> None:
        self.num_inference_steps = int(num_inference_steps)
        self.timesteps = inference_timesteps(self.config, self.num_inference_steps)

    def predict_x0(self, i: int, out: np.ndarray, sample: np.ndarray) -> np.ndarray:
        if self.prediction_type == "epsilon":
            x0 = (sample - self._sqrt_beta[i] * out) / self._sqrt_alpha[i]
        else:
            x0 = out
        if self.clip is not None:
            x0 = np.clip(x0, -self.clip, self.clip)
        return x0


class DDIMSampler(NumpySampler):
    """diffusers ``DDIMScheduler.step`` with ``use_clipped_model_output=False``."""

    def __init__(self, config: Mapping[str, Any], num_inference_steps: int, eta: float = 0.0) -> None:
        self.eta = float(eta)
        self.stochastic = self.eta > 0
        super().__init__(config, num_inference_steps)

    def set_timesteps(self, num_inference_steps: int) -> None:
        super().set_timesteps(num_inference_steps)
        ac = self.alphas_cumprod
        final = np.float32(1.0) if self.config.get("set_alpha_to_one", True) else ac[0]
        n = int(self.config["num_train_timesteps"])
        prev = self.timesteps - n // self.num_inference_steps
        a_t = ac[self.timesteps].astype(np.float64)
        a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final).astype(np.float64)
        variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        sigma = self.eta * np.sqrt(variance)
        # plain floats: numpy keeps float32 arrays float32 when multiplied by them
        self._sqrt_alpha, self._sqrt_beta = np.sqrt(a_t).tolist(), np.sqrt(1 - a_t).tolist()
        self._sqrt_alpha_prev = np.sqrt(a_prev).tolist()
        self._sigma = sigma.tolist()
        self._dir = np.sqrt(np.maximum(1 - a_prev - sigma**2, 0.0)).tolist()

    def step(
        self, i: int, out: np.ndarray, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        """Step ``i`` (index into ``timesteps``): model output, x_t -> x_{t-1}; ``noise`` only for eta > 0."""
        x0 = self.predict_x0(i, out, sample)
        if self.prediction_type == "epsilon":
            eps = out
        else:
            # from the unclipped prediction, as diffusers does without use_clipped_model_output
            eps = (sample - self._sqrt_alpha[i] * out) / self._sqrt_beta[i]
        prev = self._sqrt_alpha_prev[i] * x0 + self._dir[i] * eps
        if self.stochastic:
            if noise is None:
                raise ValueError("DDIM with eta > 0 needs noise for every step")
            prev = prev + self._sigma[i] * noise
        return prev.astype(sample.dtype, copy=False)


class DDPMSampler(NumpySampler):
    """diffusers ``DDPMScheduler.step`` with ``variance_type`` ``fixed_small`` or ``fixed_large``."""

    stochastic = True

    def __init__(self, config: Mapping[str, Any], num_inference_steps: int) -> None:
        variance_type = config.get("variance_type", "fixed_small")
        if variance_type not in ("fixed_small", "fixed_large"):
            raise ValueError(
                f"DDPM variance_type={variance_type!r} is not supported; use fixed_small or fixed_large"
            )
        self.variance_type = variance_type
        super().__init__(config, num_inference_steps)

    def set_timesteps(self, num_inference_steps: int) -> None:
        super().set_timesteps(num_inference_steps)
        ac = self.alphas_cumprod
        t = self.timesteps
        prev = np.append(t[1:], -1)
        a_t = ac[t].astype(np.float64)
        a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], 1.0).astype(np.float64)
        beta_t, beta_prev = 1 - a_t, 1 - a_prev
        current_alpha = a_t / a_prev
        current_beta = 1 - current_alpha
        self._sqrt_alpha, self._sqrt_beta = np.sqrt(a_t).tolist(), np.sqrt(beta_t).tolist()
        self._x0_coeff = (np.sqrt(a_prev) * current_beta / beta_t).tolist()
        self._x_coeff = (np.sqrt(current_alpha) * beta_prev / beta_t).tolist()
        if self.variance_type == "fixed_small":
            variance = np.maximum(beta_prev / beta_t * current_beta, 1e-20)
        else:
            variance = current_beta
        # no noise is added at t == 0
        self._sigma = np.where(t > 0, np.sqrt(variance), 0.0).tolist()

    def step(
        self, i: int, out: np.ndarray, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        """Step ``i``: model output and x_t -> x_{t-1}; ``noise`` (standard normal, like ``sample``) is
        required while t > 0."""
        x0 = self.predict_x0(i, out, sample)
        prev = self._x0_coeff[i] * x0 + self._x_coeff[i] * sample
        if self._sigma[i] > 0:
            if noise is None:
                raise ValueError("DDPM needs noise for every step with t > 0")
            prev = prev + self._sigma[i] * noise
        return prev.astype(sample.dtype, copy=False)


FLOW_SOLVERS = {"euler": 1, "midpoint": 2, "heun": 2}


class FlowSampler:
    """Flow-matching ODE from t = 1 (noise) to t = 0 on the grid t_i = 1 - i / N, as the torch
    ``FlowMatchingScheduler``: ``timesteps`` are the denoiser's evaluation times (float32, ``t *
    num_train_timesteps``), one per Euler step and two per midpoint / Heun step; the model output is the
    velocity. ``step`` must be called for every index in order (two-stage solvers keep the step's start)."""

    stochastic = False

    def __init__(self, config: Mapping[str, Any], num_inference_steps: int) -> None:
        if config.get("prediction_type", "flow") != "flow":
            kind = config.get("prediction_type")
            raise ValueError(f"flow matching prediction_type={kind!r}; expected 'flow'")
        self.config = dict(config)
        self.solver = self.config.get("solver", "euler")
        if self.solver not in FLOW_SOLVERS:
            raise ValueError(f"flow solver={self.solver!r} is not one of {list(FLOW_SOLVERS)}")
        self.clip = float(config.get("clip_sample_range", 1.0)) if config.get("clip_sample", True) else None
        self.set_timesteps(num_inference_steps)

    def set_timesteps(self, num_inference_steps: int) -> None:
        n = int(num_inference_steps)
        if n < 1:
            raise ValueError(f"num_inference_steps={n} must be >= 1")
        self.num_inference_steps = n
        grid = np.linspace(1.0, 0.0, n + 1)
        if self.solver == "euler":
            times = grid[:-1]
        elif self.solver == "midpoint":
            times = np.stack([grid[:-1], (grid[:-1] + grid[1:]) / 2], axis=1).ravel()
        else:
            times = np.stack([grid[:-1], grid[1:]], axis=1).ravel()
        self.grid = grid.tolist()
        self.timesteps = (times * float(self.config["num_train_timesteps"])).astype(np.float32)
        self._pending: tuple[np.ndarray, np.ndarray] | None = None

    def step(
        self, i: int, out: np.ndarray, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        """Evaluation ``i`` (index into ``timesteps``): velocity and state -> state at the next evaluation."""
        per_step = FLOW_SOLVERS[self.solver]
        k, stage = divmod(i, per_step)
        dt = self.grid[k + 1] - self.grid[k]
        if self.solver == "euler":
            prev = sample + dt * out
        elif stage == 0:
            self._pending = (sample, out)
            prev = sample + (dt / 2 if self.solver == "midpoint" else dt) * out
        else:
            start, velocity = self._pending
            self._pending = None
            prev = start + dt * out if self.solver == "midpoint" else start + dt / 2 * (velocity + out)
        if self.clip is not None and i == len(self.timesteps) - 1:
            prev = np.clip(prev, -self.clip, self.clip)
        return prev.astype(sample.dtype, copy=False)


def make_sampler(scheduler_class: str, config: Mapping[str, Any], num_inference_steps: int, eta: float = 0.0):
    """``"DDIMScheduler"`` / ``"DDPMScheduler"`` (diffusers' class names) or ``"FlowMatchingScheduler"`` ->
    the numpy sampler."""
    if scheduler_class == "DDIMScheduler":
        return DDIMSampler(config, num_inference_steps, eta)
    if scheduler_class == "DDPMScheduler":
        return DDPMSampler(config, num_inference_steps)
    if scheduler_class == "FlowMatchingScheduler":
        return FlowSampler(config, num_inference_steps)
    raise ValueError(
        f"scheduler {scheduler_class} is not supported by the runtime; use DDIM, DDPM or flow matching"
    )
