"""Which sampler a policy denoises with: scheduler checks at construction and swapping DDPM / DDIM / flow
solvers on a built policy (``eval.py --sampler``)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

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
