"""Pieces shared by every diffusion policy (UNet and transformer, state and image): construction checks,
the denoising loop, the training loss and the observation/action queues of the online ``select_action``
interface."""

from __future__ import annotations

import inspect
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from diffusion_policy.model.diffusion.flow_matching import (
    DEFAULT_INFERENCE_STEPS,
    SOLVERS,
    FlowMatchingScheduler,
    is_flow_matching,
)

PREDICTION_TYPES = ("epsilon", "sample")
DIFFUSION_SAMPLERS = ("ddpm", "ddim")
SAMPLERS = (*DIFFUSION_SAMPLERS, *SOLVERS)
NORMALIZER_HINT = "call set_normalizer(dataset.get_normalizer()) first"


def check_scheduler(
    noise_scheduler: Any, num_inference_steps: int | None, step_kwargs: Mapping[str, Any]
) -> int:
    """Validate the scheduler settings a policy relies on; returns the number of inference steps to use.

    Diffusion (DDPM/DDIM): None means every training timestep, at most ``num_train_timesteps``. Flow
    matching: None means ``DEFAULT_INFERENCE_STEPS``; any count >= 1 (time is continuous).
    """
    config = getattr(noise_scheduler, "config", None)
    if config is None or not hasattr(noise_scheduler, "step") or not hasattr(noise_scheduler, "add_noise"):
        raise TypeError(
            f"noise_scheduler must be a diffusers scheduler (e.g. DDPMScheduler), "
            f"got {type(noise_scheduler).__name__}"
        )
    if is_flow_matching(noise_scheduler):
        steps = DEFAULT_INFERENCE_STEPS if num_inference_steps is None else num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_inference_steps={steps!r} must be an integer >= 1 for flow matching")
        check_step_kwargs(noise_scheduler, step_kwargs)
        return steps
    prediction_type = config.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"noise_scheduler prediction_type={prediction_type!r} is not supported; "
            f"use one of {list(PREDICTION_TYPES)}"
        )
    num_train = int(config.num_train_timesteps)
    if num_inference_steps is None:
        num_inference_steps = num_train
    if not 1 <= num_inference_steps <= num_train:
        raise ValueError(
            f"num_inference_steps={num_inference_steps} must be in [1, num_train_timesteps={num_train}]"
        )
    check_step_kwargs(noise_scheduler, step_kwargs)
    return int(num_inference_steps)


def check_step_kwargs(noise_scheduler: Any, step_kwargs: Mapping[str, Any]) -> None:
    """The policy's extra keyword arguments must be ones ``noise_scheduler.step`` takes."""
    params = inspect.signature(noise_scheduler.step).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    reserved = {"model_output", "timestep", "sample", "generator", "return_dict"}
    bad = [k for k in step_kwargs if k in reserved or (not takes_any and k not in params)]
    if bad:
        raise ValueError(
            f"unexpected policy arguments {bad}: extra keyword arguments are passed to "
            f"{type(noise_scheduler).__name__}.step(), which does not accept them"
        )


def use_sampler(policy: nn.Module, sampler: str | None = None, num_inference_steps: int | None = None) -> str:
    """Change how a built policy samples, without touching its weights.

    A diffusion-trained policy takes ``sampler`` ``"ddpm"`` or ``"ddim"``: both walk the schedule it was
    trained with, so a DDPM-trained checkpoint can be evaluated with DDIM and vice versa;
    ``num_inference_steps`` None means every training timestep for DDPM and the current count for DDIM.
    A flow-matching policy takes an ODE solver, ``"euler"``, ``"midpoint"`` or ``"heun"``; None keeps the
    current count. ``sampler`` None keeps the current scheduler or solver and changes the step count.
    Step arguments the new scheduler does not take (DDIM's ``eta`` under DDPM) are dropped.
    Returns a label such as ``"DDPMScheduler-100"``.
    """
    from diffusers import DDIMScheduler, DDPMScheduler

    current = policy.noise_scheduler
    if is_flow_matching(current):
        if sampler is not None and sampler not in SOLVERS:
            raise ValueError(
                f"sampler={sampler!r}: this policy was trained with flow matching; "
                f"its samplers are the ODE solvers {list(SOLVERS)}"
            )
        if sampler is not None and sampler != current.config.solver:
            current = FlowMatchingScheduler(**{**current.config, "solver": sampler})
        if num_inference_steps is None:
            num_inference_steps = policy.num_inference_steps
    else:
        classes = dict(zip(DIFFUSION_SAMPLERS, (DDPMScheduler, DDIMScheduler)))
        if sampler is None:
            cls = type(current)
        elif sampler in classes:
            cls = classes[sampler]
        elif sampler in SOLVERS:
            raise ValueError(
                f"sampler={sampler!r} is a flow-matching solver, but this policy was trained as a diffusion "
                f"model; use one of {list(classes)}"
            )
        else:
            raise ValueError(
                f"sampler={sampler!r} is not one of {list(classes)} (diffusion) or {list(SOLVERS)}"
            )
        if cls is not type(current):
            accepted = inspect.signature(cls.__init__).parameters
            current = cls(**{k: v for k, v in current.config.items() if k in accepted})
        if num_inference_steps is None:
            keep = sampler is None or cls is DDIMScheduler
            num_inference_steps = policy.num_inference_steps if keep else current.config.num_train_timesteps
    step_params = inspect.signature(current.step).parameters
    kwargs = {k: v for k, v in getattr(policy, "kwargs", {}).items() if k in step_params}
    steps = check_scheduler(current, int(num_inference_steps), kwargs)
    policy.noise_scheduler, policy.num_inference_steps, policy.kwargs = current, steps, kwargs
    return sampler_label(policy)


def sampler_label(policy: nn.Module) -> str:
    """``"<scheduler class>-<inference steps>"``, e.g. ``"DDIMScheduler-8"``; flow matching names its solver,
    e.g. ``"FlowMatchingScheduler-euler-4"``."""
    scheduler = policy.noise_scheduler
    name = type(scheduler).__name__
    if is_flow_matching(scheduler):
        name += f"-{scheduler.config.solver}"
    return f"{name}-{policy.num_inference_steps}"


def action_dim_from_shape_meta(shape_meta: Mapping) -> int:
    """``shape_meta["action"]["shape"]`` -> Da, with a one-line error when it is missing or not 1-D."""
    if "action" not in shape_meta or "shape" not in shape_meta["action"]:
        raise ValueError("shape_meta has no action shape; add e.g. action: {shape: [2]}")
    shape = list(shape_meta["action"]["shape"])
    if len(shape) != 1:
        raise ValueError(f"shape_meta action shape {shape} must be 1-D, e.g. [2]")
    return int(shape[0])


def check_action_window(horizon: int, n_obs_steps: int, n_action_steps: int, start: int) -> None:
    """The executed actions ``[start, start + n_action_steps)`` must lie inside the predicted horizon."""
    if n_obs_steps < 1 or n_action_steps < 1:
        raise ValueError(f"n_obs_steps={n_obs_steps} and n_action_steps={n_action_steps} must be >= 1")
    if start + n_action_steps > horizon:
        raise ValueError(
            f"n_action_steps={n_action_steps} does not fit: actions start at step {start} "
            f"(from n_obs_steps={n_obs_steps}) of horizon={horizon}, "
            f"so n_action_steps must be <= {horizon - start}"
        )


def check_sequence_length(model: nn.Module, length: int, what: str) -> None:
    """The UNet halves the sequence ``len(down_dims) - 1`` times, so its length must divide evenly."""
    factor = getattr(model, "downsample_factor", 1)
    if length % factor != 0:
        raise ValueError(
            f"{what}={length} is not divisible by {factor} = 2 ** (len(down_dims) - 1) of the UNet; "
            f"use a multiple of {factor} or fewer down_dims"
        )


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
    **step_kwargs,
) -> torch.Tensor:
    """Denoise from Gaussian noise to a trajectory shaped like ``condition_data`` (B, T, D).

    Where ``condition_mask`` (bool, (B, T, D)) is True the trajectory is held at ``condition_data``
    (inpainting); pass None when nothing is known. ``generator`` makes the noise reproducible.
    The denoiser is called as ``model(trajectory, t, **conditions)`` with the conditions that are given:
    ``local_cond`` / ``global_cond`` for the UNet, ``cond`` (B, To, Dc) tokens for the transformer.
    """
    conditions = model_conditions(local_cond=local_cond, global_cond=global_cond, cond=cond)
    device = condition_data.device
    trajectory = randn_tensor(
        condition_data.shape, generator=generator, device=device, dtype=condition_data.dtype
    )
    noise_scheduler.set_timesteps(num_inference_steps)
    timesteps = noise_scheduler.timesteps
    # one host->device copy for the model's timesteps; the scheduler gets plain ints, so it never
    # branches on a device tensor (which would force a sync per step)
    model_timesteps = timesteps.to(device)
    for i, t in enumerate(timesteps.tolist()):
        if condition_mask is not None:
            trajectory = torch.where(condition_mask, condition_data, trajectory)
        model_output = model(trajectory, model_timesteps[i], **conditions)
        trajectory = noise_scheduler.step(
            model_output, t, trajectory, generator=generator, **step_kwargs
        ).prev_sample
    if condition_mask is not None:
        trajectory = torch.where(condition_mask, condition_data, trajectory)
    return trajectory


def sample_action_chunk(
    policy: nn.Module,
    condition_data: torch.Tensor,
    condition_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    **conditions: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A policy's denoising pass and its action window, shared by every policy class.

    Samples with ``policy.model`` / ``noise_scheduler`` / ``num_inference_steps`` / ``kwargs`` (see
    :func:`conditional_sample`), unnormalizes the first ``policy.action_dim`` channels and cuts the executed
    window ``[action_start, action_start + n_action_steps)`` (the whole prediction when the policy has
    ``pred_action_steps_only``). Returns (normalized sample (B, L, D), {"action": (B, Ta, Da),
    "action_pred": (B, L, Da)}).
    """
    nsample = conditional_sample(
        policy.model,
        policy.noise_scheduler,
        policy.num_inference_steps,
        condition_data,
        condition_mask,
        generator=generator,
        **conditions,
        **policy.kwargs,
    )
    action_pred = policy.normalizer["action"].unnormalize(nsample[..., : policy.action_dim])
    if getattr(policy, "pred_action_steps_only", False):
        action = action_pred
    else:
        action = action_pred[:, policy.action_start : policy.action_start + policy.n_action_steps]
    return nsample, {"action": action, "action_pred": action_pred}


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


def encode_observations(
    obs_encoder: nn.Module,
    normalizer: Any,
    obs_shapes: Mapping[str, tuple[int, ...]],
    obs: Mapping[str, torch.Tensor],
    n_steps: int,
) -> torch.Tensor:
    """Raw image/low-dim obs {key: (B, >=n_steps, *shape)} -> normalized features (B, n_steps, F).

    The first ``n_steps`` frames of every key are normalized with ``normalizer[key]`` and all B * n_steps
    frames go through ``obs_encoder`` ({key: (N, *shape)} -> (N, F)) as one batch.
    """
    flat = {}
    for key, shape in obs_shapes.items():
        if key not in obs:
            raise KeyError(f"observation '{key}' from shape_meta is missing (got keys {sorted(obs)})")
        value = obs[key]
        if value.ndim != len(shape) + 2 or value.shape[1] < n_steps or tuple(value.shape[2:]) != shape:
            raise ValueError(
                f"observation '{key}' has shape {tuple(value.shape)}; "
                f"expected (B, >={n_steps}, *{list(shape)})"
            )
        value = normalizer[key].normalize(value[:, :n_steps])
        flat[key] = value.reshape(-1, *shape)
    batch = next(iter(obs.values())).shape[0]
    return obs_encoder(flat).reshape(batch, n_steps, -1)


class ImageObsPolicyMixin:
    """What every image-observation policy does the same way around its denoiser.

    The host class sets ``obs_encoder``, ``normalizer``, ``obs_shapes`` (from shape_meta), ``n_obs_steps``,
    ``_queues`` (:class:`OnlineQueues`) and implements ``predict_action``.
    """

    def _check_normalizer(self) -> None:
        check_normalizer(self, ("action", *self.obs_shapes))

    def _encode(self, obs: Mapping[str, torch.Tensor], n_steps: int) -> torch.Tensor:
        """Raw obs {key: (B, >=n_steps, *shape)} -> normalized features (B, n_steps, F)."""
        return encode_observations(self.obs_encoder, self.normalizer, self.obs_shapes, obs, n_steps)

    def _encode_for_prediction(self, obs_dict: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """predict_action's input {key: (B, >=To, *shape)} -> features of its first To frames (B, To, F)."""
        self._check_normalizer()
        if "past_action" in obs_dict:
            raise ValueError(f"obs_dict['past_action'] is not supported by {type(self).__name__}")
        return self._encode(obs_dict, self.n_obs_steps)

    def reset(self) -> None:
        """Start a new episode for :meth:`select_action` (clears observation and action queues)."""
        self._queues.reset()

    @torch.no_grad()
    def select_action(self, obs: Mapping[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        """One control step: obs[key] (*shape) or (B, *shape), as the PushT image env returns ->
        action (Da,) or (B, Da).

        Keeps the last n_obs_steps observations (the first one repeated after reset()) and replans every
        n_action_steps calls, when the queue of planned actions runs empty.
        """
        return online_action(self, self._queues, obs, self.obs_shapes, generator)

    def set_normalizer(self, normalizer: Any) -> None:
        """Copy the dataset's fitted normalizer (action and every obs key) into the policy."""
        self.normalizer.load_state_dict(normalizer.state_dict())


class OnlineQueues:
    """Observation history and pending actions for ``select_action``.

    After ``reset()`` the first observation is repeated to fill all ``n_obs_steps`` slots. Actions of one
    plan (B, n_action_steps, Da) are handed out one step at a time; an empty queue means "replan".
    """

    def __init__(self, n_obs_steps: int) -> None:
        self.n_obs_steps = n_obs_steps
        self.reset()

    def reset(self) -> None:
        self.observations: deque[dict[str, torch.Tensor]] = deque(maxlen=self.n_obs_steps)
        self.actions: deque[torch.Tensor] = deque()
        self.batch_size: int | None = None

    def add_observation(self, obs: dict[str, torch.Tensor]) -> None:
        """obs[key]: (B, *shape) for one time step."""
        batch = next(iter(obs.values())).shape[0]
        if self.batch_size is None:
            self.batch_size = batch
        elif batch != self.batch_size:
            raise ValueError(
                f"select_action got batch size {batch} after {self.batch_size}; call reset() first"
            )
        if not self.observations:
            self.observations.extend([obs] * self.n_obs_steps)
        else:
            self.observations.append(obs)

    def stacked_observations(self) -> dict[str, torch.Tensor]:
        """-> {key: (B, n_obs_steps, *shape)}, oldest first."""
        return {k: torch.stack([o[k] for o in self.observations], dim=1) for k in self.observations[0]}

    @property
    def needs_plan(self) -> bool:
        return not self.actions

    def add_plan(self, actions: torch.Tensor) -> None:
        """actions: (B, n_action_steps, Da), executed in order."""
        self.actions.extend(actions.unbind(dim=1))

    def pop_action(self) -> torch.Tensor:
        """-> (B, Da)."""
        return self.actions.popleft()

    def next_action(
        self, obs: dict[str, torch.Tensor], plan: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    ) -> torch.Tensor:
        """Record one step's obs {key: (B, *shape)} and return the action to execute now, (B, Da).

        ``plan(stacked_obs)`` maps {key: (B, n_obs_steps, *shape)} to (B, n_action_steps, Da); it is called
        only when the queued plan has run out.
        """
        self.add_observation(obs)
        if self.needs_plan:
            self.add_plan(plan(self.stacked_observations()))
        return self.pop_action()


def init_denoising_state(
    policy: nn.Module,
    model: nn.Module,
    noise_scheduler: Any,
    mask_generator: nn.Module,
    horizon: int,
    action_dim: int,
    n_action_steps: int,
    n_obs_steps: int,
    action_start: int,
    step_kwargs: Mapping[str, Any],
) -> None:
    """Set what every policy's sampling loop, loss and ``select_action`` read (:func:`sample_action_chunk`).

    Registration order fixes the state-dict order, as in the original: (the caller's ``obs_encoder``,) then
    ``model``, ``mask_generator``, ``normalizer``.
    """
    from diffusion_policy.model.common.normalizer import LinearNormalizer

    policy.model = model
    policy.noise_scheduler = noise_scheduler
    policy.mask_generator = mask_generator
    policy.normalizer = LinearNormalizer()
    policy.horizon = horizon
    policy.action_dim = action_dim
    policy.n_action_steps = n_action_steps
    policy.n_obs_steps = n_obs_steps
    policy.action_start = action_start
    policy.kwargs = dict(step_kwargs)
    policy._queues = OnlineQueues(n_obs_steps)


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


def check_normalizer(policy: nn.Module, keys: Iterable[str]) -> None:
    """Fail with one line when the policy's normalizer lacks a field it needs."""
    missing = [k for k in keys if k not in policy.normalizer]
    if missing:
        raise RuntimeError(f"{type(policy).__name__} normalizer lacks {missing}; {NORMALIZER_HINT}")


def online_action(
    policy: nn.Module,
    queues: OnlineQueues,
    obs: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One ``select_action`` step of any policy: obs[key] (*shape) or (B, *shape) -> action (Da,) or (B, Da),
    replanning with ``policy.predict_action`` when the queue is empty."""
    step_obs, batched = to_single_step_batch(obs, shapes, policy.device, policy.dtype)
    action = queues.next_action(
        step_obs, lambda stacked: policy.predict_action(stacked, generator=generator)["action"]
    )
    return action if batched else action[0]


def to_single_step_batch(
    obs: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], device: torch.device, dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], bool]:
    """One env step's observations -> ({key: (B, *shape)} on device, whether the input had a batch dim).

    Accepts tensors or numpy arrays shaped (*shape) (single env) or (B, *shape) (vectorised envs).
    """
    out, batched_flags = {}, set()
    for key, shape in shapes.items():
        if key not in obs:
            raise KeyError(f"select_action: observation '{key}' is missing (got keys {sorted(obs)})")
        value = torch.as_tensor(obs[key], device=device, dtype=dtype)
        if tuple(value.shape) == shape:
            value = value.unsqueeze(0)
            batched_flags.add(False)
        elif value.ndim == len(shape) + 1 and tuple(value.shape[1:]) == shape:
            batched_flags.add(True)
        else:
            raise ValueError(
                f"select_action: observation '{key}' has shape {tuple(value.shape)}; "
                f"expected {shape} or (B, *{shape})"
            )
        out[key] = value
    if len(batched_flags) != 1:
        raise ValueError(
            "select_action: mix of batched and unbatched observations; give all keys a batch dim or none"
        )
    return out, batched_flags.pop()
