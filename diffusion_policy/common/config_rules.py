"""Rules across the keys of a training config, applied after the schema (``config_schema``) passed.

Each takes the validated plain data and returns ``None`` or a ``rules.Violation`` whose keys are config
keys; a command-line override of the key or of one of its ``related`` keys is named as
the value's origin. Rules that the classes building the thing apply too live in ``common.rules``; these
adapt them to the config's layout.
"""

from __future__ import annotations

from typing import Any

from diffusion_policy.common import rules
from diffusion_policy.common.rules import Violation

Data = dict[str, Any]


def _under(prefix: str, violation: Violation | None) -> Violation | None:
    return violation.under(prefix) if violation is not None else None


def action_window_fits(d: Data) -> Violation | None:
    return rules.action_window_fits(
        d["horizon"], d["n_obs_steps"], d["n_action_steps"], d.get("n_latency_steps", 0)
    )


def dataset_obs_steps_fit(d: Data) -> Violation | None:
    if "dataset_obs_steps" in d and not d["n_obs_steps"] <= d["dataset_obs_steps"] <= d["horizon"]:
        return Violation(
            "dataset_obs_steps",
            d["dataset_obs_steps"],
            f"an integer in [n_obs_steps={d['n_obs_steps']}, horizon={d['horizon']}]",
            ("n_obs_steps", "horizon"),
        )
    return None


def runner_window_matches(d: Data) -> Violation | None:
    runner = d["task"]["env_runner"] or {}
    for name in ("n_obs_steps", "n_action_steps", "n_latency_steps"):
        if name in runner and name in d and runner[name] != d[name]:
            return Violation(
                f"task.env_runner.{name}",
                runner[name],
                f"the top-level {name} ({d[name]}) the policy is built with",
                (name,),
            )
    return None


def rollout_seeds_in_range(d: Data) -> Violation | None:
    runner = d["task"]["env_runner"] or {}
    if not {"n_train", "n_test"} & set(runner):
        return None  # a runner that does not plan seeded episodes
    seeds = [runner.get(k, 0) for k in ("n_train", "n_test", "train_start_seed", "test_start_seed")]
    return _under("task.env_runner", rules.rollout_seeds_in_range(*seeds))


def lr_schedule_known(d: Data) -> Violation | None:
    return _under("training", rules.lr_schedule_known(d["training"]["lr_scheduler"]))


def accumulation_fits_epoch(d: Data) -> Violation | None:
    t = d["training"]
    violation = rules.accumulation_fits_epoch(t.get("gradient_accumulate_every", 1), t.get("max_train_steps"))
    return _under("training", violation)


def decay_keeps_weights(d: Data) -> Violation | None:
    """AdamW multiplies every weight by (1 - lr * weight_decay) per step: at >= 1 the weights flip sign."""
    opt = d["optimizer"]
    lr = opt.get("lr", opt.get("learning_rate"))
    if lr is None:
        return None
    for name in ("weight_decay", "transformer_weight_decay", "obs_encoder_weight_decay"):
        if name in opt and lr * opt[name] >= 1:
            return Violation(
                f"optimizer.{name}",
                opt[name],
                f"a number with lr * {name} < 1 (lr={lr})",
                ("optimizer.lr", "optimizer.learning_rate"),
            )
    return None


def ema_decay_in_range(d: Data) -> Violation | None:
    ema = d.get("ema")
    if not ema:
        return None
    # the defaults are EMAModel's
    args = [
        ema.get("inv_gamma", 1.0),
        ema.get("power", 2 / 3),
        ema.get("min_value", 0.0),
        ema.get("max_value", 0.9999),
    ]
    return _under("ema", rules.ema_decay_in_range(*args))


def topk_name_formats(d: Data) -> Violation | None:
    topk = d["checkpoint"]["topk"]
    fmt, key = topk.get("format_str"), topk["monitor_key"]
    if fmt is None:
        return None
    try:
        fmt.format(epoch=0, **{key.replace("/", "_"): 0.5})
    except (KeyError, IndexError, ValueError) as e:
        fields = f"{{epoch}} and {{{key.replace('/', '_')}}}"
        return Violation(
            "checkpoint.topk.format_str",
            fmt,
            f"a file name pattern using only {fields} ({type(e).__name__}: {e})",
            ("checkpoint.topk.monitor_key",),
        )
    return None


def topk_without_rollouts(d: Data) -> Violation | None:
    """Without an env runner only training and validation metrics exist; a test_* key would rank nothing."""
    topk = d["checkpoint"]["topk"]
    key = topk["monitor_key"]
    if d["task"]["env_runner"] is None and topk.get("k", 1) > 0 and key.startswith("test"):
        return Violation(
            "checkpoint.topk.monitor_key",
            key,
            "a metric logged without rollouts (val_loss, val_action_mse_error, train_loss), since "
            "task.env_runner is null",
            ("task.env_runner",),
        )
    return None


def image_shapes(d: Data) -> Violation | None:
    meta = d.get("shape_meta")
    if not meta:
        return None
    for name, obs in meta["obs"].items():
        if obs.get("type", "low_dim") == "rgb" and len(obs["shape"]) != 3:
            return Violation(
                f"shape_meta.obs.{name}.shape", obs["shape"], "[channels, height, width] for an rgb obs"
            )
    return None


# in report order: the first violation found is the one reported
CROSS_KEY_RULES = (
    action_window_fits,
    dataset_obs_steps_fit,
    runner_window_matches,
    rollout_seeds_in_range,
    accumulation_fits_epoch,
    decay_keeps_weights,
    ema_decay_in_range,
    topk_without_rollouts,
    topk_name_formats,
    image_shapes,
    lr_schedule_known,
)
