"""Steering a sampled trajectory toward known values with soft weights: real-time chunking's sampling side.

Every sampler here moves along a Gaussian path ``x = alpha * x0 + sigma * noise``: DDPM/DDIM with
``alpha = sqrt(alphas_cumprod[t])``, ``sigma = sqrt(1 - alphas_cumprod[t])``; flow matching with
``alpha = 1 - t``, ``sigma = t``. Rescaled by ``alpha + sigma`` any such point is a point of the straight
flow path at time ``tau = sigma / (alpha + sigma)``, so one guidance rule serves all of them. Two rules:

- ``guidance`` (RTC's, Black et al. 2025, after PiGDM): at every denoiser call the denoised estimate x0_hat
  moves by ``tau * w(tau) * J^T (W * (Y - x0_hat))`` where J is the Jacobian of x0_hat with respect to the
  (flow-rescaled) sample, computed by autograd through the denoiser, and
  ``w = min(beta, tau * (tau^2 + (1 - tau)^2) / ((1 - tau) * tau^2))``
  is the clipped guidance weight (beta = 5 in the paper); the scheduler then steps from the guided estimate.
- ``inpaint`` (no gradient, so it also suits the exported runtime's samplers): after every step the sample
  moves by ``W * (y_next - x)`` where ``y_next = alpha_next * Y + sigma_next * noise_hat`` puts the target at
  the next noise level along the model's own noise estimate (so weight 1 is DDIM-style hard inpainting).

Entries with weight 1 end exactly at the target with either rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from diffusion_policy.common.chunk_execution import GUIDANCE_METHODS
from diffusion_policy.model.diffusion.flow_matching import is_flow_matching

# RTC's clipped guidance weight
DEFAULT_MAX_GUIDANCE = 5.0


@dataclass
class ChunkGuide:
    """What to steer a normalized trajectory (B, L, D) toward: ``target`` (B, L, D) and ``weights`` (L, D)
    in [0, 1] (0: free), with ``method`` from :data:`GUIDANCE_METHODS` and RTC's ``max_guidance`` (beta)."""

    target: torch.Tensor
    weights: torch.Tensor
    method: str = "guidance"
    max_guidance: float = DEFAULT_MAX_GUIDANCE

    def __post_init__(self) -> None:
        if self.method not in GUIDANCE_METHODS:
            raise ValueError(f"guidance method {self.method!r} is not one of {list(GUIDANCE_METHODS)}")
        if not float(self.max_guidance) > 0:
            raise ValueError(f"max_guidance={self.max_guidance} must be > 0")

    def finish(self, trajectory: torch.Tensor) -> torch.Tensor:
        """Entries of weight 1 (the frozen prefix) are set to the target exactly."""
        return torch.where(self.weights >= 1.0, self.target.to(trajectory.dtype), trajectory)


def path_coefficients(scheduler: Any, timestep: float | int | None) -> tuple[float, float]:
    """(alpha, sigma) of the sampler's Gaussian path at ``timestep`` (denoiser units); None: the clean end."""
    if timestep is None:
        return 1.0, 0.0
    if is_flow_matching(scheduler):
        t = float(timestep) / scheduler.config.num_train_timesteps
        return 1.0 - t, t
    alpha_bar = float(scheduler.alphas_cumprod[int(timestep)])
    return alpha_bar**0.5, (1.0 - alpha_bar) ** 0.5


def denoised_estimate(scheduler: Any, output: torch.Tensor, x: torch.Tensor, alpha: float, sigma: float):
    """The model output at x -> (x0_hat, noise_hat)."""
    if is_flow_matching(scheduler):
        # x = (1 - t) x0 + t e, v = e - x0
        return x - sigma * output, x + alpha * output
    if scheduler.config.prediction_type == "epsilon":
        return (x - sigma * output) / alpha, output
    return output, (x - alpha * output) / max(sigma, 1e-12)


def output_from_estimate(scheduler: Any, x0: torch.Tensor, x: torch.Tensor, alpha: float, sigma: float):
    """Inverse of :func:`denoised_estimate`: the model output that yields x0 at x."""
    if is_flow_matching(scheduler):
        return (x - x0) / sigma
    if scheduler.config.prediction_type == "epsilon":
        return (x - alpha * x0) / sigma
    return x0


def guidance_weight(tau: float, max_guidance: float) -> float:
    """RTC's ``min(beta, (1 - tau) / (tau * r^2))`` with ``r^2 = (1 - tau)^2 / (tau^2 + (1 - tau)^2)``,
    written in this module's time, where tau = 1 is noise."""
    if tau <= 0.0 or tau >= 1.0:
        return float(max_guidance)
    return min(float(max_guidance), (tau**2 + (1 - tau) ** 2) / ((1 - tau) * tau))


def guided_output(
    model: Any,
    scheduler: Any,
    trajectory: torch.Tensor,
    model_timestep: torch.Tensor,
    timestep: float | int,
    conditions: dict[str, torch.Tensor],
    guide: ChunkGuide,
) -> torch.Tensor:
    """The denoiser's output at ``trajectory`` with RTC guidance applied (method ``guidance``)."""
    alpha, sigma = path_coefficients(scheduler, timestep)
    scale = alpha + sigma
    tau = sigma / scale
    with torch.enable_grad():
        x = trajectory.detach().requires_grad_(True)
        output = model(x, model_timestep, **conditions)
        x0, _ = denoised_estimate(scheduler, output, x, alpha, sigma)
        residual = guide.weights * (guide.target - x0)
        (pull,) = torch.autograd.grad(x0, x, grad_outputs=residual.detach())
    # J^T with respect to the flow-rescaled sample x / scale
    pull = pull * scale
    x0 = x0.detach() + tau * guidance_weight(tau, guide.max_guidance) * pull
    return output_from_estimate(scheduler, x0, trajectory, alpha, sigma).detach()


def inpaint_step(
    scheduler: Any,
    output: torch.Tensor,
    before: torch.Tensor,
    after: torch.Tensor,
    timestep: float | int,
    next_timestep: float | int | None,
    guide: ChunkGuide,
) -> torch.Tensor:
    """Method ``inpaint``: the stepped sample ``after`` pulled toward the target at the next noise level."""
    alpha, sigma = path_coefficients(scheduler, timestep)
    _, noise_hat = denoised_estimate(scheduler, output, before, alpha, sigma)
    alpha_next, sigma_next = path_coefficients(scheduler, next_timestep)
    target_next = alpha_next * guide.target + sigma_next * noise_hat
    return after + guide.weights * (target_next - after)
