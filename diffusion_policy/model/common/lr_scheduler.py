"""Learning-rate schedules from diffusers, stepped once per optimizer step.

``get_scheduler("cosine", ...)`` is diffusers' cosine-with-warmup (half a cosine period: lr rises from 0 over
the warmup, then falls to 0 at ``num_training_steps``), built from diffusers' own schedule functions. The one
difference from ``diffusers.optimization.get_scheduler``: the step is clamped at ``num_training_steps``, so
training past the planned length stays at the final lr instead of the cosine rising again (which the
original's resumed runs did when they overshot).
"""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from diffusion_policy.common.rules import enforce, lr_schedule_known


def get_scheduler(
    name: str,
    optimizer: Optimizer,
    num_warmup_steps: int | None = None,
    num_training_steps: int | None = None,
    last_epoch: int = -1,
    **kwargs,
) -> LambdaLR:
    """A ``LambdaLR`` for the diffusers schedule ``name`` (linear, cosine, constant_with_warmup, ...)."""
    from diffusers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    enforce(lr_schedule_known(name))
    schedule_type = SchedulerType(name)
    schedule_func = TYPE_TO_SCHEDULER_FUNCTION[schedule_type]
    if schedule_type == SchedulerType.CONSTANT:
        scheduler = schedule_func(optimizer, **kwargs)
    elif schedule_type == SchedulerType.CONSTANT_WITH_WARMUP:
        scheduler = schedule_func(optimizer, num_warmup_steps=num_warmup_steps, **kwargs)
    else:
        if num_warmup_steps is None or num_training_steps is None:
            raise ValueError(f"lr schedule {name!r} needs num_warmup_steps and num_training_steps")
        scheduler = schedule_func(
            optimizer, num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps, **kwargs
        )
        if num_training_steps > 0:
            scheduler.lr_lambdas = [_clamped(fn, num_training_steps) for fn in scheduler.lr_lambdas]
    if last_epoch >= 0:
        # the original resumes by rebuilding the schedule at the current step
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        scheduler.last_epoch = last_epoch
        scheduler.step()
    return scheduler


def _clamped(fn, max_step: int):
    def lr_lambda(step: int) -> float:
        return fn(min(step, max_step))

    return lr_lambda
