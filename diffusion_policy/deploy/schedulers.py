"""DDIM and DDPM sampling steps in numpy, following diffusers' ``DDIMScheduler`` / ``DDPMScheduler`` for the
settings the policies use (tests compare them step by step with diffusers), and the flow-matching ODE
(:mod:`diffusion_policy.common.flow_ode`, shared with the torch scheduler).

The noise schedule is not recomputed here: the exporter stores diffusers' own ``alphas_cumprod`` (and DDIM's
final alpha) and the timesteps its ``set_timesteps`` picks for every step count (:func:`scheduler_tables` in
the exporter), and these samplers only apply the update formulas to them. Predictions ``epsilon`` and
``sample``; ``clip_sample``; DDIM with any ``eta``; DDPM with ``fixed_small`` or ``fixed_large`` variance.
Anything else raises ValueError naming the setting.

Every per-step coefficient is computed once in ``set_timesteps``, so a step is a few fused array operations.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from diffusion_policy.common.flow_ode import FlowODE

PREDICTIONS = ("epsilon", "sample")


def _check_common(config: Mapping[str, Any]) -> None:
    if config.get("prediction_type", "epsilon") not in PREDICTIONS:
        raise ValueError(
            f"prediction_type={config.get('prediction_type')!r} is not supported; use {PREDICTIONS}"
        )
    if config.get("thresholding"):
        raise ValueError("thresholding=True is not supported by the numpy sampler")


class NumpySampler:
    """Shared by DDIM and DDPM: per-step coefficients ``x0 = a * x + b * out`` (epsilon) or ``x0 = out``
    (sample), then ``prev = c * x0 + d * x (+ e * eps) + sigma * noise``.

    ``tables``: this scheduler class's entry of the exporter's :func:`scheduler_tables`:
    ``{"alphas_cumprod": [...], "final_alpha_cumprod": float, "timesteps": {"<steps>": [...]}}``.
    """

    stochastic = False
    scheduler_class = ""

    def __init__(
        self, config: Mapping[str, Any], tables: Mapping[str, Any], num_inference_steps: int
    ) -> None:
        _check_common(config)
        self.config = dict(config)
        self.tables = tables
        self.alphas_cumprod = np.asarray(tables["alphas_cumprod"], dtype=np.float32)
        self.prediction_type = config.get("prediction_type", "epsilon")
        self.clip = float(config.get("clip_sample_range", 1.0)) if config.get("clip_sample", True) else None
        self.set_timesteps(num_inference_steps)

    def set_timesteps(self, num_inference_steps: int) -> None:
        table = self.tables["timesteps"]
        if str(int(num_inference_steps)) not in table:
            raise ValueError(
                f"{self.scheduler_class} with num_inference_steps={num_inference_steps} is not among the "
                f"step counts the export holds (up to {max(int(k) for k in table)}); export the checkpoint "
                f"with policy.num_inference_steps={num_inference_steps}"
            )
        self.num_inference_steps = int(num_inference_steps)
        self.timesteps = np.asarray(table[str(self.num_inference_steps)], dtype=np.int64)

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

    scheduler_class = "DDIMScheduler"

    def __init__(
        self, config: Mapping[str, Any], tables: Mapping[str, Any], num_inference_steps: int, eta: float = 0.0
    ) -> None:
        self.eta = float(eta)
        self.stochastic = self.eta > 0
        super().__init__(config, tables, num_inference_steps)

    def set_timesteps(self, num_inference_steps: int) -> None:
        super().set_timesteps(num_inference_steps)
        ac = self.alphas_cumprod
        final = np.float32(self.tables["final_alpha_cumprod"])
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
    scheduler_class = "DDPMScheduler"

    def __init__(
        self, config: Mapping[str, Any], tables: Mapping[str, Any], num_inference_steps: int
    ) -> None:
        variance_type = config.get("variance_type", "fixed_small")
        if variance_type not in ("fixed_small", "fixed_large"):
            raise ValueError(
                f"DDPM variance_type={variance_type!r} is not supported; use fixed_small or fixed_large"
            )
        self.variance_type = variance_type
        super().__init__(config, tables, num_inference_steps)

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


class FlowSampler:
    """The flow-matching ODE (:class:`diffusion_policy.common.flow_ode.FlowODE`, the same code the torch
    ``FlowMatchingScheduler`` runs) on numpy arrays: ``timesteps`` are the denoiser's evaluation times
    (float32, ``t * num_train_timesteps``), one per Euler step and two per midpoint / Heun step; the model
    output is the velocity. ``step`` must be called for every index in order."""

    stochastic = False

    def __init__(self, config: Mapping[str, Any], num_inference_steps: int) -> None:
        if config.get("prediction_type", "flow") != "flow":
            kind = config.get("prediction_type")
            raise ValueError(f"flow matching prediction_type={kind!r}; expected 'flow'")
        self.config = dict(config)
        self.solver = self.config.get("solver", "euler")
        self.clip = float(config.get("clip_sample_range", 1.0)) if config.get("clip_sample", True) else None
        self.set_timesteps(num_inference_steps)

    def set_timesteps(self, num_inference_steps: int) -> None:
        self._ode = FlowODE(self.solver, num_inference_steps, self.clip)
        self.num_inference_steps = self._ode.num_steps
        n_train = float(self.config["num_train_timesteps"])
        self.timesteps = np.array([t * n_train for t in self._ode.times], dtype=np.float32)

    def step(
        self, i: int, out: np.ndarray, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        """Evaluation ``i`` (index into ``timesteps``): velocity and state -> state at the next evaluation."""
        return self._ode.step(i, out, sample).astype(sample.dtype, copy=False)


def make_sampler(
    scheduler_class: str,
    config: Mapping[str, Any],
    num_inference_steps: int,
    eta: float = 0.0,
    tables: Mapping[str, Any] | None = None,
):
    """``"DDIMScheduler"`` / ``"DDPMScheduler"`` (diffusers' class names) with the export's ``tables`` (the
    exporter's :func:`scheduler_tables`), or ``"FlowMatchingScheduler"`` -> the numpy sampler."""
    if scheduler_class == "FlowMatchingScheduler":
        return FlowSampler(config, num_inference_steps)
    if scheduler_class not in ("DDIMScheduler", "DDPMScheduler"):
        raise ValueError(
            f"scheduler {scheduler_class} is not supported by the runtime; use DDIM, DDPM or flow matching"
        )
    if tables is None or scheduler_class not in tables:
        raise ValueError(f"the export holds no {scheduler_class} tables; re-export the checkpoint")
    if scheduler_class == "DDIMScheduler":
        return DDIMSampler(config, tables[scheduler_class], num_inference_steps, eta)
    return DDPMSampler(config, tables[scheduler_class], num_inference_steps)
