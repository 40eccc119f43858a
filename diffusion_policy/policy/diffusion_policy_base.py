"""The base classes of every diffusion policy: what they share around their denoiser.

:class:`DiffusionPolicyBase` owns the denoising state (network, noise scheduler, inpainting mask generator,
normalizer, action window, step arguments, online queues) and does, the same way for every policy, the
sampling pass of ``predict_action``, the loss of ``compute_loss``, ``select_action``, ``reset`` and
``set_normalizer``. A policy says only how its observations become the denoiser's input, in two methods:

- ``prediction_inputs(obs_dict)`` -> (condition_data, condition_mask, conditions) for sampling,
- ``training_inputs(batch)`` -> (trajectory, condition_mask, conditions) for the loss,

where ``conditions`` are the denoiser's keyword conditions (``global_cond`` / ``local_cond`` for the UNet,
``cond`` for the transformer). :class:`LowdimDiffusionPolicy` and :class:`ImageDiffusionPolicy` add what
state and image observations need (shape checks, normalizer fields, the image encoder).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from diffusion_policy.common.online_queues import OnlineQueues, check_step_keys, check_window, step_is_batched
from diffusion_policy.model.common.module_attr_mixin import ModuleAttrMixin
from diffusion_policy.model.common.normalizer import LinearNormalizer
from diffusion_policy.policy.action_window import ActionWindow
from diffusion_policy.policy.base_image_policy import BaseImagePolicy
from diffusion_policy.policy.base_lowdim_policy import BaseLowdimPolicy
from diffusion_policy.policy.chunk_guidance import DEFAULT_MAX_GUIDANCE, ChunkGuide
from diffusion_policy.policy.denoising import conditional_sample, diffusion_loss, inpainting_mask_generator
from diffusion_policy.policy.samplers import check_scheduler

NORMALIZER_HINT = "call set_normalizer(dataset.get_normalizer()) first"
Inputs = tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor | None]]


class DiffusionPolicyBase(ModuleAttrMixin):
    """Denoising state and the shared sampling / loss / online interface of a diffusion policy.

    Args:
        model: the denoiser, ``model(trajectory (B, L, D), t, **conditions) -> (B, L, D)``.
        noise_scheduler: a diffusers scheduler (DDPM, DDIM) or :class:`FlowMatchingScheduler`.
        window: the action window (horizon, To, Ta, Da, where the executed actions start).
        obs_shapes: {key: shape} of the raw observations ``select_action`` takes.
        num_inference_steps, step_kwargs: sampling steps and extra ``noise_scheduler.step`` arguments.
        inpaint_dim: channels after the actions that are inpainted (obs or features), 0 when conditioning.
        obs_encoder: registered first when given, as the original's image policies do.

    Registration order is the original's: (``obs_encoder``,) ``model``, ``mask_generator``, ``normalizer``;
    it fixes the order of ``parameters()`` and of the state dict.
    """

    normalizer_keys: tuple[str, ...] = ("action",)

    def __init__(
        self,
        model: nn.Module,
        noise_scheduler: Any,
        window: ActionWindow,
        obs_shapes: Mapping[str, tuple[int, ...]],
        num_inference_steps: int | None,
        step_kwargs: Mapping[str, Any],
        inpaint_dim: int = 0,
        obs_encoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        step_kwargs = dict(step_kwargs)
        self.num_inference_steps = check_scheduler(noise_scheduler, num_inference_steps, step_kwargs)
        if obs_encoder is not None:
            self.obs_encoder = obs_encoder
        self.model = model
        self.noise_scheduler = noise_scheduler
        self.mask_generator = inpainting_mask_generator(
            window.action_dim, inpaint_dim, window.n_obs_steps, inpaint=inpaint_dim > 0
        )
        self.normalizer = LinearNormalizer()
        self.window = window
        self.obs_shapes = dict(obs_shapes)
        self.kwargs = step_kwargs
        self._queues = OnlineQueues(window.n_obs_steps, torch.stack)
        # how a ``guide`` passed to predict_action steers sampling (real-time chunking); eval.py sets them
        self.guide_method = "guidance"
        self.max_guidance = DEFAULT_MAX_GUIDANCE

    # the window's numbers, under the names the original's policies have them
    horizon = property(lambda self: self.window.horizon)
    n_obs_steps = property(lambda self: self.window.n_obs_steps)
    n_action_steps = property(lambda self: self.window.n_action_steps)
    action_dim = property(lambda self: self.window.action_dim)
    action_start = property(lambda self: self.window.action_start)
    pred_action_steps_only = property(lambda self: self.window.pred_action_steps_only)

    @property
    def chunk_start(self) -> int:
        """Index in ``action_pred`` of the action for the current step: the chunk runs from there on."""
        return 0 if self.pred_action_steps_only else self.action_start

    @property
    def chunk_length(self) -> int:
        """How many actions ``action_pred`` predicts from the current step on."""
        return self.window.sample_length - self.chunk_start

    # ---------------- what each policy defines ----------------
    def prediction_inputs(self, obs_dict: Mapping[str, torch.Tensor]) -> Inputs:
        """Raw observations -> (condition_data (B, L, D), condition_mask or None, denoiser conditions)."""
        raise NotImplementedError

    def training_inputs(self, batch: Mapping[str, Any]) -> Inputs:
        """A raw training batch -> (clean normalized trajectory (B, L, D), condition_mask or None,
        denoiser conditions)."""
        raise NotImplementedError

    def extra_predictions(self, nsample: torch.Tensor) -> dict[str, torch.Tensor]:
        """Further outputs read off the normalized sample (B, L, D) (the inpainted observations)."""
        return {}

    # ---------------- shared ----------------
    def _check_normalizer(self) -> None:
        missing = [k for k in self.normalizer_keys if k not in self.normalizer]
        if missing:
            raise RuntimeError(f"{type(self).__name__} normalizer lacks {missing}; {NORMALIZER_HINT}")

    @torch.no_grad()
    def predict_action(
        self,
        obs_dict: Mapping[str, torch.Tensor],
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        guide: tuple[Any, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """obs_dict: raw observations with To >= n_obs_steps frames (``{"obs": (B, To, Do)}`` for a state
        policy, ``{key: (B, To, *shape)}`` for an image policy) -> {"action": (B, n_action_steps, Da),
        "action_pred": (B, L, Da)} raw, L = horizon (n_action_steps with ``pred_action_steps_only``).

        ``noise`` (B, L, D), when given, is the initial Gaussian sample (D = Da, plus the inpainted
        channels); otherwise it is drawn with ``generator``. ``guide`` = (target (B, H, Da) raw actions,
        weights (H,) in [0, 1]) for the H = ``chunk_length`` actions from the current step on steers the
        sample toward the target (real-time chunking; ``guide_method`` and ``max_guidance`` say how).
        """
        self._check_normalizer()
        if "past_action" in obs_dict:
            raise ValueError(f"obs_dict['past_action'] is not supported by {type(self).__name__}")
        condition_data, condition_mask, conditions = self.prediction_inputs(obs_dict)
        # all-zero weights (an empty overlap) leave plain sampling, bit for bit
        chunk_guide = None if guide is None else self._chunk_guide(guide, condition_data)
        if chunk_guide is not None and not bool(chunk_guide.weights.any()):
            chunk_guide = None
        nsample = conditional_sample(
            self.model,
            self.noise_scheduler,
            self.num_inference_steps,
            condition_data,
            condition_mask,
            generator=generator,
            noise=noise,
            guide=chunk_guide,
            **conditions,
            **self.kwargs,
        )
        action_pred = self.normalizer["action"].unnormalize(nsample[..., : self.action_dim])
        if chunk_guide is not None:
            # the frozen actions are the old chunk's to the bit, not a normalize/unnormalize round trip
            frozen = torch.zeros(action_pred.shape[1], dtype=torch.bool, device=action_pred.device)
            frozen[self.chunk_start :] = torch.as_tensor(guide[1], device=frozen.device) >= 1
            target = torch.as_tensor(guide[0], dtype=action_pred.dtype, device=action_pred.device)
            action_pred[:, frozen] = target[:, frozen[self.chunk_start :]]
        action = action_pred
        if not self.pred_action_steps_only:
            action = action_pred[:, self.action_start : self.action_start + self.n_action_steps]
        return {"action": action, "action_pred": action_pred, **self.extra_predictions(nsample)}

    def _chunk_guide(self, guide: tuple[Any, Any], like: torch.Tensor) -> ChunkGuide:
        """Raw (target (B, H, Da), weights (H,)) -> the normalized guide over the whole sample (B, L, D)."""
        target, weights = guide
        target = torch.as_tensor(target, dtype=like.dtype, device=like.device)
        weights = torch.as_tensor(weights, dtype=like.dtype, device=like.device)
        batch, length = like.shape[0], self.chunk_length
        if tuple(target.shape) != (batch, length, self.action_dim) or tuple(weights.shape) != (length,):
            raise ValueError(
                f"guide target {tuple(target.shape)} / weights {tuple(weights.shape)}; expected "
                f"({batch}, {length}, {self.action_dim}) / ({length},): the actions from the current step on"
            )
        if bool(((weights < 0) | (weights > 1)).any()):
            raise ValueError("guide weights must lie in [0, 1]")
        start = self.chunk_start
        full_target = torch.zeros_like(like)
        full_target[:, start:, : self.action_dim] = self.normalizer["action"].normalize(target)
        full_weights = torch.zeros(like.shape[1:], dtype=like.dtype, device=like.device)
        full_weights[start:, : self.action_dim] = weights[:, None]
        return ChunkGuide(full_target, full_weights, self.guide_method, self.max_guidance)

    def compute_loss(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """batch: {"obs": raw observations over the horizon, "action": (B, T, Da) raw} -> scalar denoising
        loss (see :func:`diffusion_loss`)."""
        self._check_normalizer()
        trajectory, condition_mask, conditions = self.training_inputs(batch)
        return diffusion_loss(self.model, self.noise_scheduler, trajectory, condition_mask, **conditions)

    def compile_networks(self, mode: str = "default") -> list[str]:
        """``torch.compile`` the networks in place (``nn.Module.compile``); the names compiled.

        Only the networks: the normalizer, the noise draws and the scheduler's arithmetic around them stay
        eager, so a compiled step draws the same noise as an eager one. In place, so parameter names and
        state-dict keys stay the same (no ``_orig_mod.``) and checkpoints load into uncompiled policies.
        Static shapes: a batch of a new size compiles once more (the last, smaller batch of an epoch).
        """
        names = [
            name for name in ("obs_encoder", "model") if isinstance(getattr(self, name, None), nn.Module)
        ]
        for name in names:
            getattr(self, name).compile(mode=mode, dynamic=False)
        return names

    def encoder_channels_last(self) -> bool:
        """Store the image encoder's weights in ``torch.channels_last`` memory format; False when the policy
        has no 2D convolution to convert.

        Its convolutions then run in NHWC, which oneDNN computes faster in bf16 (1.10-1.11x on the CPU image
        recipe's step) though not in float32 (1.00x); values and state-dict keys are unchanged, and a
        checkpoint loads into a policy in either format."""
        encoder = getattr(self, "obs_encoder", None)
        if not isinstance(encoder, nn.Module) or not any(isinstance(m, nn.Conv2d) for m in encoder.modules()):
            return False
        encoder.to(memory_format=torch.channels_last)
        return True

    def _executed(self, trajectory: torch.Tensor) -> torch.Tensor:
        """The executed window of a (B, T, ...) trajectory, what ``pred_action_steps_only`` denoises."""
        return trajectory[:, self.action_start : self.action_start + self.n_action_steps]

    def reset(self) -> None:
        """Start a new episode for :meth:`select_action` (clears observation and action queues)."""
        self._queues.reset()

    @torch.no_grad()
    def select_action(self, obs: Mapping[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        """One control step: obs[key] (*shape) or (B, *shape), as the env returns -> action (Da,) or (B, Da).

        Keeps the last n_obs_steps observations (the first one repeated after reset()) and replans every
        n_action_steps calls, when the queue of planned actions runs empty.
        """
        check_step_keys(obs, self.obs_shapes)
        step_obs = {k: torch.as_tensor(obs[k], device=self.device, dtype=self.dtype) for k in self.obs_shapes}
        batched = step_is_batched(step_obs, self.obs_shapes)
        if not batched:
            step_obs = {k: v.unsqueeze(0) for k, v in step_obs.items()}
        action = self._queues.next_action(
            step_obs, lambda stacked: self.predict_action(stacked, generator=generator)["action"]
        )
        return action if batched else action[0]

    def set_normalizer(self, normalizer: LinearNormalizer) -> None:
        """Copy the dataset's fitted normalizer (action and every observation field) into the policy."""
        self.normalizer.load_state_dict(normalizer.state_dict())


class LowdimDiffusionPolicy(DiffusionPolicyBase, BaseLowdimPolicy):
    """A diffusion policy on one low-dimensional observation vector ``obs`` (Do,) per step."""

    normalizer_keys = ("action", "obs")

    def __init__(
        self,
        obs_dim: int,
        model: nn.Module,
        noise_scheduler: Any,
        window: ActionWindow,
        num_inference_steps: int | None,
        step_kwargs: Mapping[str, Any],
        inpaint_dim: int = 0,
    ) -> None:
        obs_shapes = {"obs": (obs_dim,)}
        super().__init__(
            model, noise_scheduler, window, obs_shapes, num_inference_steps, step_kwargs, inpaint_dim
        )
        self.obs_dim = obs_dim

    def normalized_obs(self, obs_dict: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """obs_dict["obs"]: (B, >=To, Do) raw -> its first To steps normalized (B, To, Do)."""
        obs = obs_dict["obs"]
        check_window("obs", tuple(obs.shape), (self.obs_dim,), self.n_obs_steps)
        return self.normalizer["obs"].normalize(obs[:, : self.n_obs_steps])

    def extra_predictions(self, nsample: torch.Tensor) -> dict[str, torch.Tensor]:
        """When inpainting [action, obs]: "obs_pred" (B, T, Do) and "action_obs_pred" (B, Ta, Do)."""
        if self.mask_generator.obs_dim == 0:
            return {}
        obs_pred = self.normalizer["obs"].unnormalize(nsample[..., self.action_dim :])
        return {"obs_pred": obs_pred, "action_obs_pred": self._executed(obs_pred)}

    @torch.no_grad()
    def select_action(self, obs: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        """One control step: obs (obs_dim,) or (B, obs_dim), or {"obs": that} -> action (Da,) or (B, Da)."""
        return super().select_action(obs if isinstance(obs, Mapping) else {"obs": obs}, generator)


class ImageDiffusionPolicy(DiffusionPolicyBase, BaseImagePolicy):
    """A diffusion policy whose observations (rgb and low-dim keys of ``shape_meta``) pass, frame by frame,
    through ``obs_encoder`` ({key: (N, *shape)} -> (N, F)) before they condition the denoiser."""

    @property
    def normalizer_keys(self) -> tuple[str, ...]:
        return ("action", *self.obs_shapes)

    def encode(self, obs: Mapping[str, torch.Tensor], n_steps: int) -> torch.Tensor:
        """Raw obs {key: (B, >=n_steps, *shape)} -> normalized features (B, n_steps, F).

        The first ``n_steps`` frames of every key are normalized and all B * n_steps frames go through the
        encoder as one batch.
        """
        flat = {}
        for key, shape in self.obs_shapes.items():
            if key not in obs:
                raise KeyError(f"observation '{key}' from shape_meta is missing (got keys {sorted(obs)})")
            value = obs[key]
            check_window(key, tuple(value.shape), shape, n_steps)
            flat[key] = self.normalizer[key].normalize(value[:, :n_steps]).reshape(-1, *shape)
        batch = next(iter(obs.values())).shape[0]
        return self.obs_encoder(flat).reshape(batch, n_steps, -1)
