"""The schema of the framework's own config blocks: types and ranges of single values.

Covered: ``training``, ``dataloader`` / ``val_dataloader``, ``checkpoint``, ``logging``, ``ema``, the
optimizer's common numbers, the top-level action window (``horizon``, ``n_obs_steps``, ``n_action_steps``,
...), ``shape_meta`` and ``task.env_runner``. Policy, model and noise-scheduler arguments are not: their
classes check them when they are built. Keys the schema does not know are accepted, so the original's
configs (resolved, or with ``${eval:...}``) load unchanged.

The blocks are pydantic models in strict mode (pydantic comes with wandb, which the framework requires): a
``"5"`` or ``5.0`` where an integer belongs is an error, not silently converted, because the code reads the
config itself, not the validated copy. Each field's ``description`` is the "allowed" part of the message.
Rules across keys, and ranges that a class checks too (EMA decay, rollout seeds), are in ``config_rules``
and ``rules``; ``config_check.validate_config`` applies all of them.
"""

import types
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from diffusion_policy.common.rules import MAX_SEED

# Upper bounds are typo guards, each far beyond any recipe: they turn an extra zero or an exponent into an
# error instead of a run that spawns a billion workers or rolls out forever.
MAX_WINDOW = 10_000  # horizon and the steps inside it
MAX_DIM = 10_000  # observation / action sizes, image sides
MAX_WORKERS = 1_024
MAX_EPISODES = 100_000  # per rollout
MAX_ENV_STEPS = 100_000  # per episode
MAX_FPS = 1_000
MAX_LR = 1.0


def _int(lo: int | None = None, hi: int | None = None, optional: bool = False) -> Any:
    """A strict integer type in [lo, hi] whose description says so."""
    if lo is not None and hi is not None:
        text = f"an integer in [{lo}, {hi}]"
    elif lo is not None:
        text = f"an integer >= {lo}"
    else:
        text = "an integer"
    base = int | None if optional else int
    return Annotated[base, Field(ge=lo, le=hi, description=text + (" or null" if optional else ""))]


def _num(text: str, **bounds: float) -> Any:
    """A strict number (int or float) within ``bounds`` (gt / ge / lt / le), described by ``text``."""
    return Annotated[float, Field(description=text, allow_inf_nan=False, **bounds)]


Bool = Annotated[bool, Field(description="true or false")]
Str = Annotated[str, Field(description="a string")]
OptStr = Annotated[str | None, Field(description="a string or null")]
Target = Annotated[str, Field(description="a class path string (package.module.Class)")]
Probability = _num("a number in [0, 1]", ge=0, le=1)
Number = _num("a number")


def _no_int(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError("an integer here makes torch's AdamW fail")
    return value


# torch's AdamW refuses betas that mix ints and floats ([0, 0.999]): write 0.0
Beta = Annotated[float, BeforeValidator(_no_int), Field(ge=0, lt=1)]


class _Block(BaseModel):
    # extra="allow": the original's configs carry keys this code ignores; strict: see the module docstring
    model_config = ConfigDict(extra="allow", strict=True)


class TrainingBlock(_Block):
    # whether the device exists is machine-dependent: device_util checks that when the run starts
    device: Annotated[
        str,
        Field(
            pattern=r"(?i)^\s*(auto|cpu|mps|cuda(:\d+)?)\s*$", description="cpu, cuda, cuda:N, mps or auto"
        ),
    ]
    seed: _int(0, MAX_SEED)
    debug: Bool = False
    resume: Bool = True
    lr_scheduler: Str
    lr_warmup_steps: _int(0)
    num_epochs: _int(1)
    gradient_accumulate_every: _int(1) = 1
    use_ema: Bool
    rollout_every: _int(1)
    checkpoint_every: _int(1)
    val_every: _int(1)
    sample_every: _int(1)
    max_train_steps: _int(1, optional=True) = None
    max_val_steps: _int(1, optional=True) = None
    tqdm_interval_sec: _num("a number >= 0", ge=0) = 1.0
    deterministic: Bool = False
    mixed_precision: Annotated[
        Literal["bf16", "auto"] | None,
        Field(description="null (float32), 'bf16' or 'auto' (bf16 where the hardware has it)"),
    ] = None
    channels_last: Bool = False
    compile: Bool = False
    compile_mode: Annotated[
        Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        Field(description="a torch.compile mode (default, reduce-overhead, max-autotune, ...)"),
    ] = "default"


class LoaderBlock(_Block):
    batch_size: _int(1)
    num_workers: _int(0, MAX_WORKERS) = 0
    shuffle: Bool = False
    pin_memory: Bool = False
    persistent_workers: Bool = False


class TopKBlock(_Block):
    monitor_key: Str
    mode: Annotated[Literal["max", "min"], Field(description="'max' or 'min'")] = "min"
    k: _int(0) = 1
    format_str: Str = "epoch={epoch:03d}-train_loss={train_loss:.3f}.ckpt"


class CheckpointBlock(_Block):
    topk: TopKBlock
    save_last_ckpt: Bool = True
    save_last_snapshot: Bool = False


class LoggingBlock(_Block):
    project: OptStr = None
    resume: Annotated[bool | str, Field(description="true, false or a wandb resume mode")] = True
    mode: Annotated[
        Literal["online", "offline", "disabled", "dryrun"],
        Field(description="'online', 'offline' or 'disabled'"),
    ] = "offline"
    name: OptStr = None
    tags: Annotated[list[str] | None, Field(description="a list of strings or null")] = None
    id: OptStr = None
    group: OptStr = None


class EmaBlock(_Block):
    # the decay's ranges are EMAModel's own check (rules.ema_decay_in_range), applied by config_rules
    target: Target = Field(alias="_target_")
    update_after_step: _int(0) = 0
    inv_gamma: Number = 1.0
    power: Number = 2 / 3
    min_value: Number = 0.0
    max_value: Number = 0.9999


class OptimizerBlock(_Block):
    """A ``_target_`` optimizer's kwargs, or the arguments of a policy's ``get_optimizer``."""

    target: Target | None = Field(default=None, alias="_target_")
    lr: _num(f"a number in (0, {MAX_LR}]", gt=0, le=MAX_LR) = 1e-3
    learning_rate: _num(f"a number in (0, {MAX_LR}]", gt=0, le=MAX_LR) = 1e-3
    weight_decay: _num("a number >= 0", ge=0) = 0.0
    transformer_weight_decay: _num("a number >= 0", ge=0) = 0.0
    obs_encoder_weight_decay: _num("a number >= 0", ge=0) = 0.0
    betas: Annotated[
        list[Beta],
        Field(
            min_length=2, max_length=2, description="two floats in [0, 1) such as [0.9, 0.999] (0.0, not 0)"
        ),
    ] = [0.9, 0.999]
    eps: _num("a number > 0", gt=0) = 1e-8


class EnvRunnerBlock(_Block):
    target: Target = Field(alias="_target_")
    n_train: _int(0, MAX_EPISODES) = 0
    n_train_vis: _int(0) = 0
    # seed ranges: the runners' own check (rules.rollout_seeds_in_range), applied by config_rules
    train_start_seed: _int() = 0
    n_test: _int(0, MAX_EPISODES) = 0
    n_test_vis: _int(0) = 0
    test_start_seed: _int() = 0
    legacy_test: Bool = False
    max_steps: _int(1, MAX_ENV_STEPS) = 200
    n_obs_steps: _int(1, MAX_WINDOW) = 1
    n_action_steps: _int(1, MAX_WINDOW) = 1
    n_latency_steps: _int(0, MAX_WINDOW) = 0
    fps: _int(1, MAX_FPS) = 10
    past_action: Bool = False
    agent_keypoints: Bool = False
    keypoint_visible_rate: Probability = 1.0
    n_envs: _int(1, optional=True) = None
    render_size: _int(1, MAX_DIM) = 96
    crf: _int(0, 51) = 22  # h264's quality scale
    tqdm_interval_sec: _num("a number >= 0", ge=0) = 5.0


class TaskBlock(_Block):
    # null: a task without a simulator, judged on validation episodes (no rollouts)
    env_runner: EnvRunnerBlock | None


Dim = _int(1, MAX_DIM)


class ObsMeta(_Block):
    shape: Annotated[list[Dim], Field(min_length=1, description="a non-empty list of integers >= 1")]
    type: Annotated[Literal["rgb", "low_dim"], Field(description="'rgb' or 'low_dim'")] = "low_dim"


class ActionMeta(_Block):
    shape: Annotated[list[Dim], Field(min_length=1, max_length=1, description="[action_dim]")]


class ShapeMeta(_Block):
    obs: Annotated[dict[str, ObsMeta], Field(min_length=1, description="a mapping of observation keys")]
    action: ActionMeta


class RunConfig(_Block):
    """The framework's part of a training config. Field order is report order: the window comes first, so
    a bad ``n_obs_steps`` is named itself rather than through the env runner that interpolates it."""

    target: Target = Field(alias="_target_")
    horizon: _int(1, MAX_WINDOW)
    n_obs_steps: _int(1, MAX_WINDOW)
    n_action_steps: _int(1, MAX_WINDOW)
    n_latency_steps: _int(0, MAX_WINDOW) = 0
    dataset_obs_steps: _int(1, MAX_WINDOW) = 1
    past_action_visible: Bool = False
    keypoint_visible_rate: Probability = 1.0
    obs_dim: Dim = 1
    action_dim: Dim = 1
    keypoint_dim: Dim = 1
    shape_meta: ShapeMeta | None = None
    training: TrainingBlock
    dataloader: LoaderBlock
    val_dataloader: LoaderBlock
    optimizer: OptimizerBlock
    ema: EmaBlock | None = None
    checkpoint: CheckpointBlock
    logging: LoggingBlock
    task: TaskBlock


# the config keys the schema reads; only these are resolved (a policy's ${eval:} never runs here)
CHECKED_KEYS = (
    "_target_",
    "horizon",
    "n_obs_steps",
    "n_action_steps",
    "n_latency_steps",
    "dataset_obs_steps",
    "past_action_visible",
    "keypoint_visible_rate",
    "obs_dim",
    "action_dim",
    "keypoint_dim",
    "shape_meta",
    "training",
    "dataloader",
    "val_dataloader",
    "optimizer",
    "ema",
    "checkpoint",
    "logging",
    "task.env_runner",
)


def field_description(error: dict[str, Any], parts: list[Any]) -> str:
    """What the field of a pydantic ``error`` (at config key ``parts``) allows, or pydantic's own words."""
    t: Any = RunConfig
    description = None
    for part in parts:
        t = _unwrap(t)
        if isinstance(t, type) and issubclass(t, BaseModel):
            name = "target" if part == "_target_" else part
            field = t.model_fields.get(name)
            if field is None:
                break
            description, t = field.description, field.annotation
            for meta in field.metadata:
                description = getattr(meta, "description", None) or description
        elif typing.get_origin(t) in (list, dict):
            t = typing.get_args(t)[-1]
            description = _annotated_description(t) or description
        else:
            break
    if description and error["type"] not in ("dict_type", "model_type", "model_attributes_type"):
        return description
    if error["type"] in ("dict_type", "model_type", "model_attributes_type"):
        return "a mapping (a config block)"
    return error["msg"][0].lower() + error["msg"][1:]


def _unwrap(t: Any) -> Any:
    """``X | None`` -> X, ``Annotated[X, ...]`` -> X."""
    while True:
        if typing.get_origin(t) is Annotated:
            t = typing.get_args(t)[0]
            continue
        args = typing.get_args(t)
        if typing.get_origin(t) in (typing.Union, types.UnionType) and args:
            non_none = [a for a in args if a is not type(None)]
            if len(non_none) == 1:
                t = non_none[0]
                continue
        return t


def _annotated_description(t: Any) -> str | None:
    if typing.get_origin(t) is Annotated:
        for meta in typing.get_args(t)[1:]:
            if getattr(meta, "description", None):
                return meta.description
    return None
