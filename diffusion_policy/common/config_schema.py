"""The schema of the framework's own config blocks, checked before a run writes anything.

Covered: ``training``, ``dataloader`` / ``val_dataloader``, ``checkpoint``, ``logging``, ``ema``, the
optimizer's common numbers, the top-level action window (``horizon``, ``n_obs_steps``, ``n_action_steps``,
...), ``shape_meta`` and ``task.env_runner``. Policy, model and noise-scheduler arguments are not: their
classes check them when they are built. Keys the schema does not know are accepted, so the original's
configs (resolved, or with ``${eval:...}``) load unchanged.

The blocks are pydantic models in strict mode (pydantic comes with wandb, which the framework requires): a
``"5"`` or ``5.0`` where an integer belongs is an error, not silently converted, because the code reads the
config itself, not the validated copy. Each field's ``description`` is the "allowed" part of the message.
Rules that involve several keys are plain functions below the models.

A failure is one :class:`ConfigError` line naming the key, the value, what is allowed and where the value
came from, e.g.::

    training.num_epochs=-1 is not allowed: an integer >= 1 (set on the command line: training.num_epochs=-1)

``train.py`` checks the composed config through :class:`ValidateBeforeRun` (a Hydra callback that runs
before Hydra creates the run directory); every training workspace checks it again when it is built, which
covers sweeps, ``eval.py`` and library use.
"""

import re
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from diffusion_policy.common.errors import ConfigError

# Upper bounds are typo guards, each far beyond any recipe: they turn an extra zero or an exponent into an
# error instead of a run that spawns a billion workers or rolls out forever.
MAX_WINDOW = 10_000  # horizon and the steps inside it
MAX_DIM = 10_000  # observation / action sizes, image sides
MAX_WORKERS = 1_024
MAX_EPISODES = 100_000  # per rollout
MAX_ENV_STEPS = 100_000  # per episode
MAX_FPS = 1_000
MAX_LR = 1.0
MAX_SEED = 2**32 - 1  # numpy's seed range


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
        Literal["bf16"] | None, Field(description="null (float32) or 'bf16' (bfloat16 autocast)")
    ] = None


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
    target: Target = Field(alias="_target_")
    update_after_step: _int(0) = 0
    inv_gamma: _num("a number > 0", gt=0) = 1.0
    power: _num("a number > 0", gt=0) = 2 / 3
    min_value: Probability = 0.0
    max_value: Probability = 0.9999


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
    train_start_seed: _int(0, MAX_SEED) = 0
    n_test: _int(0, MAX_EPISODES) = 0
    n_test_vis: _int(0) = 0
    test_start_seed: _int(0, MAX_SEED) = 0
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


# ====================================================================== where a value came from
@dataclass(frozen=True)
class ConfigSource:
    """Where a config came from: the command-line overrides, and words for everything else."""

    overrides: tuple[str, ...] = ()
    description: str = "the config"

    @classmethod
    def from_hydra(
        cls, hydra_node: DictConfig | None = None, config_name: str | None = None, default: str = "the config"
    ) -> "ConfigSource":
        """From Hydra's ``hydra`` node (default: the running job's); ``default`` describes a plain config."""
        if hydra_node is None:
            from hydra.core.hydra_config import HydraConfig

            if not HydraConfig.initialized():
                return cls(description=default)
            hydra_node = HydraConfig.get()
        overrides = tuple(OmegaConf.to_container(hydra_node.overrides.task, resolve=False))
        name = config_name or OmegaConf.select(hydra_node, "job.config_name", default=None) or "the config"
        groups = set(OmegaConf.select(hydra_node, "runtime.choices", default={}) or {})
        chosen = [o for o in overrides if _override_key(o) in groups]
        where = f"config {name}" + (f" with {' '.join(chosen)}" if chosen else "")
        return cls(overrides=overrides, description=where)

    def origin(self, key: str, *related: str) -> str:
        """Which command-line override set ``key`` (or, for a rule across keys, one of ``related``)."""
        for candidate in (key, *related):
            for override in self.overrides:
                k = _override_key(override)
                if candidate == k or candidate.startswith((k + ".", k + "[")):
                    return f"set on the command line: {override}"
        return f"from {self.description}"


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


_SIMPLE_INTERPOLATION = re.compile(r"^\$\{([A-Za-z_][\w.]*)\}$")


def _trace(raw: Any, parts: list[Any]) -> list[Any]:
    """The key a value at ``parts`` really comes from, following plain ``${a.b}`` interpolations."""
    for _ in range(20):  # interpolation chains are short; this bounds a cycle
        node, redirected = raw, None
        for i, part in enumerate(parts):
            if isinstance(node, str) and (m := _SIMPLE_INTERPOLATION.match(node)):
                redirected = m.group(1).split(".") + parts[i:]
                break
            try:
                node = node[part]
            except (KeyError, IndexError, TypeError):
                return parts
        else:
            if isinstance(node, str) and (m := _SIMPLE_INTERPOLATION.match(node)):
                redirected = m.group(1).split(".")
        if redirected is None:
            return parts
        parts = redirected
    return parts


def _key(parts: list[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


# ====================================================================== the check
_ABSENT = object()


def validate_config(
    cfg: DictConfig, source: ConfigSource | None = None, skip_unresolvable: bool = False
) -> None:
    """Raise a one-line :class:`ConfigError` if a framework value is wrong; ``cfg`` may be unresolved.

    ``skip_unresolvable``: if a checked block cannot be resolved yet (Hydra's own ``${hydra:...}`` values
    exist only once the job runs), check nothing and leave it all to the workspace's check.
    """
    source = source or ConfigSource()
    raw = OmegaConf.to_container(cfg, resolve=False)
    data: dict[str, Any] = {}
    for key in CHECKED_KEYS:
        try:
            node = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=True)
            if isinstance(node, DictConfig | ListConfig):
                node = OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
        except MissingMandatoryValue as e:
            missing = getattr(e, "full_key", None) or key
            raise ConfigError(
                f"{missing} is not set (???): give it a value ({source.origin(missing)})"
            ) from None
        except OmegaConfBaseException as e:
            if skip_unresolvable:
                return
            detail = " ".join(str(e).split("\n")[0].split())
            raise ConfigError(f"{key} cannot be resolved: {detail} ({source.origin(key)})") from None
        if node is _ABSENT:
            continue
        parent = data
        *head, last = key.split(".")
        for h in head:
            parent = parent.setdefault(h, {})
        parent[last] = node
    runner = data.get("task", {}).get("env_runner")
    if isinstance(runner, dict) and "_target_" not in runner:
        # what debug=fast / smoke / smoke_image do to a task without a simulator: they add rollout sizes
        raise ConfigError(
            f"task.env_runner has settings {sorted(runner)} but no _target_: a task without a simulator "
            "needs task.env_runner: null, and its smoke run is debug=smoke_no_sim (debug=fast/smoke/"
            f"smoke_image add rollout settings) ({source.origin('task.env_runner')})"
        )
    try:
        RunConfig.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        first = errors[0]
        parts = ["_target_" if p == "target" else p for p in first["loc"]]
        allowed = _allowed(first, parts)
        origins = {
            _key(_trace(raw, ["_target_" if p == "target" else p for p in err["loc"]])) for err in errors
        }
        others = len(origins) - 1
        more = f" (and {others} more problem{'s' if others > 1 else ''})" if others > 0 else ""
        raise ConfigError(
            _message(raw, parts, first.get("input"), allowed, source, first["type"]) + more
        ) from None
    for rule in CROSS_FIELD_RULES:
        problem = rule(data)
        if problem is not None:
            parts, value, allowed, *related = problem
            raise ConfigError(_message(raw, parts, value, allowed, source, "rule", related))


def _message(raw, parts, value, allowed, source, kind, related=()) -> str:
    origin = _trace(raw, parts)
    key, origin_key = _key(parts), _key(origin)
    via = f" (used as {key})" if origin_key != key else ""
    where = source.origin(origin_key, *(_key(_trace(raw, r.split("."))) for r in related))
    if kind == "missing":
        return f"{origin_key} is missing{via}: it must be {allowed} ({where})"
    return f"{origin_key}={value!r}{via} is not allowed: {allowed} ({where})"


def _allowed(error: dict[str, Any], parts: list[Any]) -> str:
    """The description of the field the error is about, or pydantic's own words."""
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


# ====================================================================== rules across keys
# Each takes the validated plain data and returns None, or (key parts, value, what is allowed, *other keys
# the rule involves); a command-line override of any of those keys is named as the origin.


def _action_window_fits(d):
    used = d["n_obs_steps"] - 1 + d["n_action_steps"] + d.get("n_latency_steps", 0)
    if used > d["horizon"]:
        return (
            ["n_action_steps"],
            d["n_action_steps"],
            f"n_obs_steps - 1 + n_action_steps + n_latency_steps must be <= horizon={d['horizon']}, "
            f"got {used} (n_obs_steps={d['n_obs_steps']}, n_latency_steps={d.get('n_latency_steps', 0)})",
            "horizon",
            "n_obs_steps",
            "n_latency_steps",
        )
    return None


def _dataset_obs_steps_fit(d):
    if "dataset_obs_steps" in d and not d["n_obs_steps"] <= d["dataset_obs_steps"] <= d["horizon"]:
        return (
            ["dataset_obs_steps"],
            d["dataset_obs_steps"],
            f"an integer in [n_obs_steps={d['n_obs_steps']}, horizon={d['horizon']}]",
            "n_obs_steps",
            "horizon",
        )
    return None


def _runner_window_matches(d):
    runner = d["task"]["env_runner"] or {}
    for name in ("n_obs_steps", "n_action_steps", "n_latency_steps"):
        if name in runner and name in d and runner[name] != d[name]:
            return (
                ["task", "env_runner", name],
                runner[name],
                f"the top-level {name} ({d[name]}) the policy is built with",
                name,
            )
    return None


def _runner_has_episodes(d):
    runner = d["task"]["env_runner"] or {}
    if runner.get("n_train", 0) + runner.get("n_test", 0) < 1 and {"n_train", "n_test"} & set(runner):
        return (
            ["task", "env_runner", "n_test"],
            runner.get("n_test", 0),
            "n_train + n_test >= 1",
            "task.env_runner.n_train",
        )
    for split in ("train", "test"):
        start, n = runner.get(f"{split}_start_seed", 0), runner.get(f"n_{split}", 0)
        if start + n > MAX_SEED + 1:
            return (
                ["task", "env_runner", f"{split}_start_seed"],
                start,
                f"{split}_start_seed + n_{split} <= {MAX_SEED + 1} (numpy's seed range)",
                f"task.env_runner.n_{split}",
            )
    return None


def _lr_scheduler_known(d):
    from diffusers.optimization import SchedulerType  # only here: diffusers imports torch

    name = d["training"]["lr_scheduler"]
    valid = [t.value for t in SchedulerType]
    if name not in valid:
        return (["training", "lr_scheduler"], name, "one of " + ", ".join(valid))
    return None


def _accumulation_fits(d):
    t = d["training"]
    if t.get("max_train_steps") is not None and t.get("gradient_accumulate_every", 1) > t["max_train_steps"]:
        return (
            ["training", "gradient_accumulate_every"],
            t["gradient_accumulate_every"],
            f"<= training.max_train_steps={t['max_train_steps']} (otherwise no optimizer step ever runs)",
            "training.max_train_steps",
        )
    return None


def _decay_keeps_weights(d):
    """AdamW multiplies every weight by (1 - lr * weight_decay) per step: at >= 1 the weights flip sign."""
    opt = d["optimizer"]
    lr = opt.get("lr", opt.get("learning_rate"))
    if lr is None:
        return None
    for name in ("weight_decay", "transformer_weight_decay", "obs_encoder_weight_decay"):
        if name in opt and lr * opt[name] >= 1:
            return (
                ["optimizer", name],
                opt[name],
                f"a number with lr * {name} < 1 (lr={lr})",
                "optimizer.lr",
                "optimizer.learning_rate",
            )
    return None


def _ema_range_ordered(d):
    ema = d.get("ema")
    if ema and ema.get("min_value", 0.0) > ema.get("max_value", 0.9999):
        return (
            ["ema", "min_value"],
            ema["min_value"],
            f"<= ema.max_value={ema.get('max_value')}",
            "ema.max_value",
        )
    return None


def _topk_name_formats(d):
    topk = d["checkpoint"]["topk"]
    fmt, key = topk.get("format_str"), topk["monitor_key"]
    if fmt is None:
        return None
    try:
        fmt.format(epoch=0, **{key.replace("/", "_"): 0.5})
    except (KeyError, IndexError, ValueError) as e:
        fields = f"{{epoch}} and {{{key.replace('/', '_')}}}"
        return (
            ["checkpoint", "topk", "format_str"],
            fmt,
            f"a file name pattern using only {fields} ({type(e).__name__}: {e})",
            "checkpoint.topk.monitor_key",
        )
    return None


def _topk_without_rollouts(d):
    """Without an env runner only training and validation metrics exist; a test_* key would rank nothing."""
    key = d["checkpoint"]["topk"]["monitor_key"]
    if d["task"]["env_runner"] is None and d["checkpoint"]["topk"].get("k", 1) > 0 and key.startswith("test"):
        return (
            ["checkpoint", "topk", "monitor_key"],
            key,
            "a metric logged without rollouts (val_loss, val_action_mse_error, train_loss), since "
            "task.env_runner is null",
            "task.env_runner",
        )
    return None


def _image_shapes(d):
    meta = d.get("shape_meta")
    if not meta:
        return None
    for name, obs in meta["obs"].items():
        if obs.get("type", "low_dim") == "rgb" and len(obs["shape"]) != 3:
            return (
                ["shape_meta", "obs", name, "shape"],
                obs["shape"],
                "[channels, height, width] for an rgb obs",
            )
    return None


CROSS_FIELD_RULES = (
    _action_window_fits,
    _dataset_obs_steps_fit,
    _runner_window_matches,
    _runner_has_episodes,
    _accumulation_fits,
    _decay_keeps_weights,
    _ema_range_ordered,
    _topk_without_rollouts,
    _topk_name_formats,
    _image_shapes,
    _lr_scheduler_known,
)


# ====================================================================== the check before Hydra writes
class ConfigRejected(BaseException):
    """Carries a :class:`ConfigError` out of a Hydra callback.

    Hydra turns ordinary exceptions raised by callbacks into warnings; this one it lets through.
    """

    def __init__(self, error: ConfigError):
        super().__init__(str(error))
        self.error = error


class ValidateBeforeRun(Callback):
    """Hydra callback: check the composed config before Hydra creates the run (or sweep) directory."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, kwargs.get("config_name"))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # swept values are not in this config yet; each job's workspace checks its own
        self._check(config, kwargs.get("config_name"))

    @staticmethod
    def _check(config: DictConfig, config_name: str | None) -> None:
        source = ConfigSource.from_hydra(config.hydra, config_name)
        try:
            validate_config(config, source, skip_unresolvable=True)
        except ConfigError as e:
            raise ConfigRejected(e) from None
