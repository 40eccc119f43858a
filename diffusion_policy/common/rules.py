"""Rules that a config's values must follow, each written once.

The config check (``config_rules``) applies them to a composed config before a run writes anything, and
the class that builds the thing applies the same function to its constructor arguments, so library use
without a config gets the same rule and the same words. Each rule takes plain values and returns ``None``
or a :class:`Violation` naming the argument at fault; :func:`enforce` turns one into an exception.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

MAX_SEED = 2**32 - 1  # numpy's seed range


@dataclass(frozen=True)
class Violation:
    """``key=value`` is not allowed: ``allowed``. ``related``: the other keys the rule reads."""

    key: str
    value: Any
    allowed: str
    related: tuple[str, ...] = ()

    def under(self, prefix: str) -> Violation:
        """The same violation with its keys (also ``key=value`` mentions of related keys in ``allowed``)
        inside the config block ``prefix`` (e.g. ``"ema"``)."""
        allowed = self.allowed
        for k in self.related:
            allowed = re.sub(rf"(?<![\w.]){re.escape(k)}=", f"{prefix}.{k}=", allowed)
        return replace(
            self,
            key=f"{prefix}.{self.key}",
            allowed=allowed,
            related=tuple(f"{prefix}.{k}" for k in self.related),
        )

    def __str__(self) -> str:
        return f"{self.key}={self.value!r} is not allowed: {self.allowed}"


def enforce(
    violation: Violation | None, error: type[Exception] = ValueError, who: str = "", block: str = ""
) -> None:
    """Raise ``error`` with the violation as its one line, if there is one: prefixed by ``who``, and with
    its keys inside the config block ``block`` (e.g. ``"training"``)."""
    if violation is None:
        return
    if block:
        violation = violation.under(block)
    raise error(f"{who}: {violation}" if who else str(violation))


def action_window_fits(
    horizon: int, n_obs_steps: int, n_action_steps: int, n_latency_steps: int = 0, oa_step_convention=True
) -> Violation | None:
    """The executed actions must lie inside the predicted horizon.

    They start at step ``n_obs_steps - 1`` (the last observed step; ``n_obs_steps`` without the original's
    ``oa_step_convention``), after ``n_latency_steps`` dropped ones.
    """
    for key, value in (("n_obs_steps", n_obs_steps), ("n_action_steps", n_action_steps)):
        if value < 1:
            return Violation(key, value, "an integer >= 1")
    if n_latency_steps < 0:
        return Violation("n_latency_steps", n_latency_steps, "an integer >= 0")
    start = (n_obs_steps - 1 if oa_step_convention else n_obs_steps) + n_latency_steps
    if start + n_action_steps <= horizon:
        return None
    where = "n_obs_steps - 1" if oa_step_convention else "n_obs_steps"
    return Violation(
        "n_action_steps",
        n_action_steps,
        f"an integer <= {horizon - start}: the executed actions start at step {start} ({where} + "
        f"n_latency_steps with n_obs_steps={n_obs_steps}, n_latency_steps={n_latency_steps}) and must end "
        f"within horizon={horizon}",
        ("horizon", "n_obs_steps", "n_latency_steps"),
    )


def accumulation_fits_epoch(
    gradient_accumulate_every: int, max_train_steps: int | None, batches_per_epoch: int | None = None
) -> Violation | None:
    """The accumulation count restarts every epoch, so it must not exceed an epoch's training steps
    (``batches_per_epoch`` once the data loader exists, capped by ``max_train_steps``)."""
    limits = [
        (n, text)
        for n, text in (
            (max_train_steps, f"max_train_steps={max_train_steps}"),
            (batches_per_epoch, "batches"),
        )
        if n is not None
    ]
    if not limits:
        return None
    steps, why = min(limits, key=lambda limit: limit[0])
    if gradient_accumulate_every <= steps:
        return None
    why = f"{steps} {why}" if why == "batches" else why
    return Violation(
        "gradient_accumulate_every",
        gradient_accumulate_every,
        f"<= the {steps} training steps of an epoch ({why}); otherwise no optimizer step ever runs",
        ("max_train_steps",),
    )


def ema_decay_in_range(
    inv_gamma: float, power: float, min_value: float, max_value: float
) -> Violation | None:
    """The EMA decay ``clamp(1 - (1 + s / inv_gamma) ** -power, min_value, max_value)`` is in [0, 1]."""
    for key, value in (("inv_gamma", inv_gamma), ("power", power)):
        if not value > 0:
            return Violation(key, value, "a number > 0")
    for key, value in (("min_value", min_value), ("max_value", max_value)):
        if not 0 <= value <= 1:
            return Violation(key, value, "a number in [0, 1]")
    if min_value > max_value:
        return Violation("min_value", min_value, f"<= max_value={max_value}", ("max_value",))
    return None


def lr_scheduler_names() -> list[str]:
    """The learning-rate schedules diffusers knows (``linear``, ``cosine``, ...)."""
    from diffusers.optimization import SchedulerType  # here: diffusers imports torch

    return [t.value for t in SchedulerType]


def lr_schedule_known(name: str) -> Violation | None:
    valid = lr_scheduler_names()
    return None if name in valid else Violation("lr_scheduler", name, "one of " + ", ".join(valid))


def rollout_seeds_in_range(
    n_train: int, n_test: int, train_start_seed: int, test_start_seed: int
) -> Violation | None:
    """There is something to roll out, and every episode's seed is within numpy's seed range."""
    if n_train + n_test < 1:
        return Violation(
            "n_test", n_test, "n_train + n_test >= 1; there is nothing to evaluate", ("n_train",)
        )
    for split, start, n in (("train", train_start_seed, n_train), ("test", test_start_seed, n_test)):
        if start < 0 or start + n > MAX_SEED + 1:
            return Violation(
                f"{split}_start_seed",
                start,
                f"{split}_start_seed >= 0 and {split}_start_seed + n_{split} <= {MAX_SEED + 1} "
                "(numpy's seed range)",
                (f"n_{split}",),
            )
    return None
