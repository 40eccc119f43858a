"""The denoising loop and the training loss every policy shares, with the inpainting condition and mask."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from diffusion_policy.model.diffusion.flow_matching import is_flow_matching
from diffusion_policy.policy.chunk_guidance import ChunkGuide, guided_output, inpaint_step
from diffusion_policy.policy.samplers import PREDICTION_TYPES


def model_conditions(**conditions: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The denoiser's keyword conditions, without the ones that are None (each network takes its own)."""
    return {k: v for k, v in conditions.items() if v is not None}


def conditional_sample(
    model: nn.Module,
    noise_scheduler: Any,
    num_inference_steps: int,
    condition_data: torch.Tensor,
    condition_mask: torch.Tensor | None = None,
    local_cond: torch.Tensor | None = None,
    global_cond: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    cond: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    guide: ChunkGuide | None = None,
    **step_kwargs,
) -> torch.Tensor:
    """Denoise from Gaussian noise to a trajectory shaped like ``condition_data`` (B, T, D).

    Where ``condition_mask`` (bool, (B, T, D)) is True the trajectory is held at ``condition_data``
    (inpainting); pass None when nothing is known. The start is ``noise`` (B, T, D) when given (the exported
    runtime takes the same argument), else drawn with ``generator``, which also drives stochastic steps.
    The denoiser is called as ``model(trajectory, t, **conditions)`` with the conditions that are given:
    ``local_cond`` / ``global_cond`` for the UNet, ``cond`` (B, To, Dc) tokens for the transformer.
    ``guide`` steers the sample toward a target with soft weights (real-time chunking,
    :mod:`diffusion_policy.policy.chunk_guidance`).
    """
    conditions = model_conditions(local_cond=local_cond, global_cond=global_cond, cond=cond)
    device = condition_data.device
    if noise is None:
        trajectory = randn_tensor(
            condition_data.shape, generator=generator, device=device, dtype=condition_data.dtype
        )
    elif tuple(noise.shape) != tuple(condition_data.shape):
        raise ValueError(
            f"noise has shape {tuple(noise.shape)}; the sampled trajectory is {tuple(condition_data.shape)}"
        )
    else:
        trajectory = noise.to(device=device, dtype=condition_data.dtype)
    noise_scheduler.set_timesteps(num_inference_steps)
    timesteps = noise_scheduler.timesteps
    # one host->device copy for the model's timesteps; the scheduler gets plain ints, so it never
    # branches on a device tensor (which would force a sync per step)
    model_timesteps = timesteps.to(device)
    times = timesteps.tolist()
    if guide is not None and guide.method == "inpaint":
        two_stage = is_flow_matching(noise_scheduler) and noise_scheduler.config.solver != "euler"
        if two_stage or getattr(noise_scheduler, "order", 1) != 1:
            raise ValueError("guidance method 'inpaint' needs a one-stage sampler (DDPM, DDIM or flow euler)")
    for i, t in enumerate(times):
        if condition_mask is not None:
            trajectory = torch.where(condition_mask, condition_data, trajectory)
        if guide is not None and guide.method == "guidance":
            model_output = guided_output(
                model, noise_scheduler, trajectory, model_timesteps[i], t, conditions, guide
            )
        else:
            model_output = model(trajectory, model_timesteps[i], **conditions)
        stepped = noise_scheduler.step(
            model_output, t, trajectory, generator=generator, **step_kwargs
        ).prev_sample
        if guide is not None and guide.method == "inpaint":
            following = times[i + 1] if i + 1 < len(times) else None
            stepped = inpaint_step(noise_scheduler, model_output, trajectory, stepped, t, following, guide)
        trajectory = stepped
    if condition_mask is not None:
        trajectory = torch.where(condition_mask, condition_data, trajectory)
    if guide is not None:
        trajectory = guide.finish(trajectory)
    return trajectory


def inpainting_mask_generator(action_dim: int, obs_dim: int, n_obs_steps: int, inpaint: bool):
    """The original's mask generator: with ``inpaint`` the obs channels of the first To steps are known;
    without (observations as conditions) nothing is."""
    from diffusion_policy.model.diffusion.mask_generator import LowdimMaskGenerator

    return LowdimMaskGenerator(
        action_dim=action_dim,
        obs_dim=obs_dim if inpaint else 0,
        max_n_obs_steps=n_obs_steps,
        fix_obs_steps=True,
        action_visible=False,
    )


def diffusion_loss(
    model: nn.Module,
    noise_scheduler: Any,
    trajectory: torch.Tensor,
    condition_mask: torch.Tensor | None = None,
    local_cond: torch.Tensor | None = None,
    global_cond: torch.Tensor | None = None,
    cond: torch.Tensor | None = None,
) -> torch.Tensor:
    """Denoising loss for a clean normalized trajectory (B, T, D) -> scalar.

    MSE against the noise (``epsilon``), the clean trajectory (``sample``) or, for a flow-matching
    scheduler, the straight path's velocity ``noise - trajectory`` at a time the scheduler draws; over the
    entries not fixed by ``condition_mask``. Masked entries count as zeros in the mean, as in the original.
    The conditions are passed to the denoiser as in :func:`conditional_sample`.
    """
    batch = trajectory.shape[0]
    noise = torch.randn_like(trajectory)
    flow = is_flow_matching(noise_scheduler)
    if flow:
        timesteps = noise_scheduler.sample_timesteps(batch, trajectory.device)
    else:
        timesteps = torch.randint(
            0,
            noise_scheduler.config.num_train_timesteps,
            (batch,),
            device=trajectory.device,
            dtype=torch.long,
        )
    noisy = noise_scheduler.add_noise(trajectory, noise, timesteps)
    if condition_mask is not None:
        noisy = torch.where(condition_mask, trajectory, noisy)
    conditions = model_conditions(local_cond=local_cond, global_cond=global_cond, cond=cond)
    pred = model(noisy, timesteps, **conditions)
    prediction_type = noise_scheduler.config.prediction_type
    if flow:
        target = noise_scheduler.get_velocity(trajectory, noise, timesteps)
    elif prediction_type == "epsilon":
        target = noise
    elif prediction_type == "sample":
        target = trajectory
    else:
        raise ValueError(
            f"prediction_type={prediction_type!r} is not supported; use one of {list(PREDICTION_TYPES)}"
        )
    loss = F.mse_loss(pred, target, reduction="none")
    if condition_mask is not None:
        loss = loss * (~condition_mask).to(loss.dtype)
    # every sample has the same number of entries, so the mean of per-sample means is the plain mean
    return loss.mean()


def inpainting_condition(
    known: torch.Tensor, horizon: int, action_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Condition for inpainting [action, obs]: known (B, To, Do) normalized obs/features ->
    (condition_data, condition_mask), both (B, horizon, action_dim + Do), the obs part of the first To
    steps known and held fixed during sampling."""
    batch, n_known, obs_dim = known.shape
    data = torch.zeros(batch, horizon, action_dim + obs_dim, device=known.device, dtype=known.dtype)
    data[:, :n_known, action_dim:] = known
    mask = torch.zeros_like(data, dtype=torch.bool)
    mask[:, :n_known, action_dim:] = True
    return data, mask
