"""Open checkpoints written by the original Diffusion Policy code without running anything from them.

The original saves ``torch.save(payload, f, pickle_module=dill)`` with::

    payload = {"cfg": <OmegaConf DictConfig, resolved>,
               "state_dicts": {"model": ..., "ema_model": ..., "optimizer": ...},
               "pickles": {"epoch": dill.dumps(int), "global_step": dill.dumps(int),
                           "_output_dir": dill.dumps(str)}}

A pickle can call any importable function while it loads, so such a file is read here with an unpickler that
resolves only an explicit allowlist of globals that rebuild data (tensors, typed storages, dicts, OmegaConf
containers and the builtin/typing objects they reference) and refuses every other global, naming it, before
anything from the file has been called. The ``pickles`` blobs are decoded the same way and must hold plain
ints / strings / None. ``dill`` itself is never imported: the one dill helper these files reference,
``dill._dill._load_type``, only maps a builtin type's name to the type and is replaced by a lookup in a fixed
table of builtin types.

:func:`convert_original_checkpoint` then writes this framework's own checkpoint (``checkpoint_io``): the
workspace named by the config's ``_target_`` is built from that config (which validates it), the original's
model / EMA model / optimizer states are loaded into it, and what the original never saved (LR-schedule
position, EMA step counter, top-k ranking, RNG) is rebuilt as a fresh run at that point would have it. The
file is written by the workspace's own ``save_checkpoint``, so it is a native checkpoint in every respect.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import io
import pickle
import random
import re
import types
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from diffusion_policy.common.errors import CheckpointError, ConfigError, one_line

# ----------------------------------------------------------------------------- the restricted unpickler
#
# Design choice: torch.load(..., pickle_module=<a module whose Unpickler is restricted>, weights_only=False)
# rather than torch's weights_only unpickler with extra safe globals. torch subclasses our Unpickler, handles
# the zip layout, storages and tensor rebuilding itself (typed-storage names such as torch.FloatStorage are
# turned into dtype markers by torch before our find_class is asked; nothing is imported for them), and
# sends every other global to our find_class, which is then the single place that decides what may be
# called. The weights_only unpickler cannot read these files even with every needed global allowed (checked
# with torch 2.14: "Can only SETITEM for dict, collections.OrderedDict, collections.Counter, but got
# defaultdict", the dict holding Hydra's ${now:} resolver cache), and which opcodes and types it accepts
# changes between torch releases. Pickle opcodes that call something (REDUCE, NEWOBJ, INST, OBJ, BUILD via
# __setstate__) can only reach objects that find_class returned, so the allowlist here bounds everything a
# file can make this process do. Only torch's zip format is accepted (see _check_torch_zip).


class RefusedGlobal(Exception):
    """A pickle asked for a global that is not on the allowlist; nothing from it was called."""

    def __init__(self, qualname: str):
        super().__init__(qualname)
        self.qualname = qualname


# dill pickles builtin types as dill._dill._load_type("<name>"); only plain data types are accepted
_BUILTIN_TYPES: dict[str, type] = {
    t.__name__: t
    for t in (dict, list, tuple, set, frozenset, int, float, complex, bool, str, bytes, bytearray)
} | {"NoneType": type(None)}


def _load_builtin_type(name: Any) -> type:
    """Stands in for ``dill._dill._load_type``, limited to the builtin data types above."""
    if not isinstance(name, str) or name not in _BUILTIN_TYPES:
        raise RefusedGlobal(f"dill._dill._load_type({name!r})")
    return _BUILTIN_TYPES[name]


def _latin1_encode(text: Any, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """Stands in for ``_codecs.encode``, which protocol-2 pickles use to carry ``bytes`` as latin-1 text."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise RefusedGlobal(f"_codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


def _attr(module: str, name: str) -> Callable[[], Any]:
    """Deferred ``module.name`` lookup, for modules this package depends on anyway."""

    def get() -> Any:
        import importlib

        return getattr(importlib.import_module(module), name)

    return get


def _value(obj: Any) -> Callable[[], Any]:
    return lambda: obj


_OMEGACONF_CLASSES = {
    "omegaconf.dictconfig": ("DictConfig",),
    "omegaconf.listconfig": ("ListConfig",),
    "omegaconf.base": ("Metadata", "ContainerMetadata"),
    # value nodes of every plain type (older OmegaConf versions store typed nodes for typed values)
    "omegaconf.nodes": (
        "AnyNode",
        "StringNode",
        "IntegerNode",
        "FloatNode",
        "BooleanNode",
        "BytesNode",
        "InterpolationResultNode",
    ),
}

# (module, name) -> how to get the object. Only things that rebuild data; never anything that acts
# (os, subprocess, builtins.eval/exec/getattr/__import__, functools.partial, ...).
ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    ("collections", "OrderedDict"): _value(collections.OrderedDict),
    ("collections", "defaultdict"): _value(collections.defaultdict),
    ("_codecs", "encode"): _value(_latin1_encode),
    ("dill._dill", "_load_type"): _value(_load_builtin_type),
    ("torch._utils", "_rebuild_tensor_v2"): _attr("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"): _attr("torch._utils", "_rebuild_parameter"),
    **{("typing", n): _attr("typing", n) for n in ("Any", "Union", "Optional", "Dict", "List", "Tuple")},
    **{(m, n): _attr(m, n) for m, names in _OMEGACONF_CLASSES.items() for n in names},
    # protocol-2 pickles name the builtins module __builtin__ (Python 2 spelling)
    **{(m, n): _value(t) for m in ("builtins", "__builtin__") for n, t in _BUILTIN_TYPES.items()},
}


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` resolves only :data:`ALLOWED_GLOBALS`."""

    def find_class(self, module: str, name: str) -> Any:
        get = ALLOWED_GLOBALS.get((module, name))
        if get is None:
            raise RefusedGlobal(f"{module}.{name}")
        return get()


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


def _restricted_loads(data: bytes, **kwargs: Any) -> Any:
    return RestrictedUnpickler(io.BytesIO(data), **kwargs).load()


# what torch.load needs from a pickle_module: Unpickler (subclassed by torch), load, and a __name__
restricted_pickle = types.ModuleType("diffusion_policy.common.legacy_checkpoint.restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler
restricted_pickle.load = _restricted_load
restricted_pickle.loads = _restricted_loads


# ----------------------------------------------------------------------------- reading an original file
@dataclass
class OriginalCheckpoint:
    """What an original checkpoint holds, as plain data (no OmegaConf or dill objects)."""

    cfg: dict[str, Any]
    state_dicts: dict[str, Any]
    epoch: int  # as the original stores it: the index of the epoch that was just finished
    global_step: int  # as the original stores it: optimizer steps done - 1
    output_dir: str | None


def _refused_message(path: Path, qualname: str, where: str) -> str:
    return (
        f"checkpoint {path} refused: {where} needs the global {qualname}, which is not on the allowlist of "
        "data-rebuilding globals (nothing from the file was run)"
    )


def _first_line(e: BaseException) -> str:
    text = one_line(e)
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def _check_torch_zip(path: Path) -> None:
    """Only torch's zip format is read (torch >= 1.6 writes it; the original's files are all in it).

    This also keeps torch.load from handing TorchScript archives to torch.jit.load and legacy tar files to
    its extraction code.
    """
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"checkpoint {path} is truncated or not a torch checkpoint (not the zip archive torch.save "
            "writes)"
        )
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is truncated or unreadable ({_first_line(e)})") from None
    data_pkls = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(data_pkls) != 1:
        raise CheckpointError(f"checkpoint {path} is not a torch checkpoint (no data.pkl record in the zip)")
    if any(n.endswith("/constants.pkl") for n in names):
        raise CheckpointError(f"checkpoint {path} is a TorchScript archive, not a training checkpoint")


def _decode_blob(path: Path, key: str, blob: Any) -> Any:
    """One ``pickles`` entry: dill.dumps of a plain value, decoded with the same allowlist."""
    if not isinstance(blob, (bytes, bytearray)):
        raise CheckpointError(
            f"checkpoint {path}: pickles['{key}'] is {type(blob).__name__}, expected pickled bytes"
        )
    try:
        value = _restricted_loads(bytes(blob), encoding="utf-8")
    except RefusedGlobal as e:
        raise CheckpointError(_refused_message(path, e.qualname, f"pickles['{key}']")) from None
    except Exception as e:
        raise CheckpointError(f"checkpoint {path}: pickles['{key}'] is corrupt ({_first_line(e)})") from None
    if value is not None and type(value) not in (int, str):
        raise CheckpointError(
            f"checkpoint {path}: pickles['{key}'] holds a {type(value).__name__}; only ints, strings and "
            "None are accepted"
        )
    return value


def _plain_config(path: Path, cfg: Any) -> dict[str, Any]:
    if not isinstance(cfg, DictConfig):
        raise CheckpointError(
            f"checkpoint {path}: 'cfg' is {type(cfg).__name__}, expected the original's OmegaConf DictConfig"
        )
    try:
        # unresolved: interpolations (if any) are resolved later with this framework's safe resolvers
        container = OmegaConf.to_container(cfg, resolve=False)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path}: its config cannot be read ({_first_line(e)})") from None
    if not isinstance(container, dict):
        raise CheckpointError(f"checkpoint {path}: its config is not a mapping")
    return container


def read_original_checkpoint(path: str | Path) -> OriginalCheckpoint:
    """Read a checkpoint the original code wrote; anything unsafe or malformed raises ``CheckpointError``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    _check_torch_zip(path)
    try:
        with open(path, "rb") as f:  # a file object: torch.load must not guess the format from the name
            payload = torch.load(
                f, map_location="cpu", pickle_module=restricted_pickle, weights_only=False, mmap=False
            )
    except RefusedGlobal as e:
        raise CheckpointError(_refused_message(path, e.qualname, "its pickle")) from None
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {path} is truncated or not a torch checkpoint ({_first_line(e)})"
        ) from None

    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(payload).__name__}, not a checkpoint dict")
    if payload.get("format") == "diffusion_policy.checkpoint":
        raise CheckpointError(f"checkpoint {path} is already in this framework's format; nothing to convert")
    missing = [k for k in ("cfg", "state_dicts", "pickles") if k not in payload]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is not an original Diffusion Policy checkpoint (no {missing} entries)"
        )
    state_dicts, pickles = payload["state_dicts"], payload["pickles"]
    if not isinstance(state_dicts, dict) or not all(isinstance(v, dict) for v in state_dicts.values()):
        raise CheckpointError(f"checkpoint {path}: 'state_dicts' is not a dict of state dicts")
    if not isinstance(pickles, dict):
        raise CheckpointError(f"checkpoint {path}: 'pickles' is not a dict")
    values = {str(k): _decode_blob(path, str(k), blob) for k, blob in pickles.items()}
    counters = {}
    for key in ("epoch", "global_step"):
        value = values.get(key)
        if type(value) is not int or value < 0:
            raise CheckpointError(
                f"checkpoint {path}: pickles['{key}'] must be a non-negative int, got {value!r}"
            )
        counters[key] = value
    output_dir = values.get("_output_dir")
    return OriginalCheckpoint(
        cfg=_plain_config(path, payload["cfg"]),
        state_dicts=state_dicts,
        epoch=counters["epoch"],
        global_step=counters["global_step"],
        output_dir=output_dir if isinstance(output_dir, str) else None,
    )


# ----------------------------------------------------------------------------- converting
def counters_from_original(epoch: int, global_step: int) -> tuple[int, int]:
    """The original's (epoch, global_step) -> this framework's.

    The original saves inside the end-of-epoch block, before ``global_step += 1; epoch += 1``: a file written
    after epoch index e holds ``epoch = e`` and ``global_step = optimizer steps done - 1``. This framework
    stores the number of completed epochs and of completed steps (what a resumed run starts from).
    """
    return epoch + 1, global_step + 1


# Every ``_target_`` in a converted config must be a class (or, inside this package, a function) defined
# under one of these: the converter builds the workspace (and with it the policy, its model, scheduler,
# optimizer and EMA) from the config, and eval / training later build the dataset and env runner, so a target
# elsewhere (os.system, torch.hub.load, ...) would be a way to run code hidden in the config instead of the
# pickle. The check is on where the located object is defined, not only on the dotted name: Hydra follows
# attribute chains, so "diffusion_policy.workspace.<module>.os.system" names os.system.
ALLOWED_TARGET_PREFIXES = (
    "diffusion_policy.workspace.",
    "diffusion_policy.policy.",
    "diffusion_policy.model.",
    "diffusion_policy.dataset.",
    "diffusion_policy.env_runner.",
    "diffusers.schedulers.",
    "torch.optim.",
)
# interpolations left in a config may use only these resolvers (the original's files are resolved anyway);
# eval/calc are this framework's arithmetic-only evaluator, now is Hydra's clock
ALLOWED_RESOLVERS = ("eval", "calc", "now")
_RESOLVER_RE = re.compile(r"\$\{\s*([^:${}\s]+)\s*:")


def _walk(node: Any, key: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(path of the parent node, key, value) for every entry of a plain nested container."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield key, k, v
        child = f"{key}[{k}]" if isinstance(node, list) else (f"{key}.{k}" if key else str(k))
        yield from _walk(v, child)


def _check_resolvers(path: Path, cfg: dict[str, Any]) -> None:
    for parent, key, value in _walk(cfg):
        if isinstance(value, str):
            for name in _RESOLVER_RE.findall(value):
                if name not in ALLOWED_RESOLVERS:
                    where = f"{parent}.{key}" if parent else str(key)
                    raise CheckpointError(
                        f"checkpoint {path}: its config's {where} uses the resolver '{name}:', which the "
                        f"converter does not run (allowed: {', '.join(ALLOWED_RESOLVERS)})"
                    )


def _check_targets(path: Path, cfg: dict[str, Any]) -> tuple[type, str, str]:
    """The workspace class and the workspace and policy targets, after checking every target in the config."""
    from hydra.utils import get_object

    for parent, key, target in _walk(cfg):
        if key != "_target_":
            continue
        where = parent or "<root>"
        what = {"<root>": "workspace", "policy": "policy"}.get(where, f"{where}._target_")
        refused = CheckpointError(
            f"checkpoint {path}: its config's {where}._target_ is {target!r}, which this framework does not "
            f"build (allowed: classes under {', '.join(p + '*' for p in ALLOWED_TARGET_PREFIXES)})"
        )
        if not isinstance(target, str) or not target.startswith(ALLOWED_TARGET_PREFIXES):
            raise refused
        try:
            obj = get_object(target)
        except Exception:
            raise CheckpointError(
                f"checkpoint {path}: its config names {what} {target!r}, which this framework does not have"
            ) from None
        module = getattr(obj, "__module__", None) or ""
        own_function = inspect.isfunction(obj) and module.startswith("diffusion_policy.")
        if not module.startswith(ALLOWED_TARGET_PREFIXES) or not (inspect.isclass(obj) or own_function):
            raise refused
    workspace = cfg.get("_target_")
    if not isinstance(workspace, str) or not workspace.startswith("diffusion_policy.workspace."):
        raise CheckpointError(f"checkpoint {path}: its config names no workspace (_target_ = {workspace!r})")
    policy_node = cfg.get("policy")
    policy = policy_node.get("_target_") if isinstance(policy_node, dict) else None
    if not isinstance(policy, str) or not policy.startswith("diffusion_policy.policy."):
        raise CheckpointError(f"checkpoint {path}: its config names no policy (policy._target_ = {policy!r})")
    workspace_cls = get_object(workspace)
    if not inspect.isclass(workspace_cls) or not inspect.isclass(get_object(policy)):
        raise CheckpointError(f"checkpoint {path}: its config's workspace or policy _target_ is not a class")
    return workspace_cls, workspace, policy


@contextlib.contextmanager
def _caller_rng_kept() -> Iterator[None]:
    """Building a workspace seeds the global RNGs; give the caller theirs back afterwards."""
    py, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


@dataclass
class ConversionResult:
    output: Path
    workspace: str
    policy: str
    original_epoch: int
    original_global_step: int
    epoch: int
    global_step: int
    seed: int
    rebuilt: str  # one line: which state was rebuilt and how


def convert_original_checkpoint(
    original: OriginalCheckpoint, output: str | Path, source: str | Path = "checkpoint"
) -> ConversionResult:
    """Write ``original`` as this framework's checkpoint at ``output`` (atomically, like training does)."""
    from hydra.utils import instantiate

    from diffusion_policy.common.checkpoint_util import TopKCheckpointManager
    from diffusion_policy.common.config_resolvers import register_resolvers
    from diffusion_policy.model.common.lr_scheduler import get_scheduler

    path, output = Path(source), Path(output)
    register_resolvers()
    _check_resolvers(path, original.cfg)
    try:
        # resolves any interpolation left in the config with this framework's (safe) resolvers
        resolved = OmegaConf.to_container(OmegaConf.create(original.cfg), resolve=True)
        cfg = OmegaConf.create(resolved)
        seed = int(cfg.training.seed)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path}: its config does not resolve ({_first_line(e)})") from None
    workspace_cls, workspace_target, policy_target = _check_targets(path, resolved)
    required = {"model", "lr_scheduler", "ema", "topk_manager"}
    state_attrs = tuple(getattr(workspace_cls, "state_attrs", ()))
    if not required <= set(state_attrs) or not hasattr(workspace_cls, "save_checkpoint"):
        raise CheckpointError(
            f"checkpoint {path}: workspace {workspace_target!r} is not a diffusion training workspace"
        )
    unknown = sorted(set(original.state_dicts) - set(state_attrs))
    if unknown:
        raise CheckpointError(
            f"checkpoint {path} holds state {unknown} that {workspace_cls.__name__} does not have"
        )
    epoch, global_step = counters_from_original(original.epoch, original.global_step)

    with _caller_rng_kept():
        try:
            workspace = workspace_cls(cfg, output_dir=str(output.parent))
            t = cfg.training
            # what the original never saved, built as run() builds it for a fresh run. The LR schedule comes
            # before the optimizer state is loaded (building it resets the optimizer's lr); its length is
            # unknown here and not part of its state: the run that resumes from this file brings its own
            lr_scheduler = get_scheduler(
                t.lr_scheduler,
                optimizer=workspace.optimizer,
                num_warmup_steps=t.lr_warmup_steps,
                num_training_steps=max(global_step, 1),
            )
            ema = None if workspace.ema_model is None else instantiate(cfg.ema, model=workspace.ema_model)
            topk_manager = TopKCheckpointManager(
                save_dir=output.parent, **OmegaConf.to_container(cfg.checkpoint.topk, resolve=True)
            )
        except (ConfigError, CheckpointError) as e:
            raise CheckpointError(
                f"checkpoint {path}: its config does not build with this code: {e}"
            ) from None
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {path}: its config does not build with this code ({_first_line(e)})"
            ) from None

        # the original's model, EMA model and optimizer: load_payload checks keys and shapes, and places
        # each AdamW moment on the parameter of its name, read from the order of the file's own model
        # state dict (the original stores no names; see optimizer_state)
        kept = tuple(a for a in ("model", "ema_model", "optimizer") if a in state_attrs)
        workspace.load_payload(
            {"state_dicts": original.state_dicts, "state": {}}, attrs=kept, source=str(path)
        )

        # positioned as a fresh run at this point would have them:
        # the LR schedule at global_step, with the original's base and current learning rates (the private
        # fields are the ones LRScheduler.step() maintains; they go into its state_dict)
        groups = workspace.optimizer.param_groups
        lr_scheduler.base_lrs = [g.get("initial_lr", b) for g, b in zip(groups, lr_scheduler.base_lrs)]
        lr_scheduler.last_epoch = global_step
        lr_scheduler._step_count = global_step + 1
        lr_scheduler._last_lr = [g["lr"] for g in groups]
        workspace.lr_scheduler = lr_scheduler
        # the EMA helper: one update per training step, and the decay its last update used
        if ema is not None:
            ema.optimization_step = global_step
            ema.decay = ema.get_decay(global_step - 1) if global_step > 0 else 0.0
            workspace.ema = ema
        # the top-k ranking: empty (the original keeps it in memory only)
        workspace.topk_manager = topk_manager
        workspace.epoch, workspace.global_step = epoch, global_step
        # RNG (global and data order): seeded from training.seed, as run() seeds a fresh run
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        if hasattr(workspace, "data_generator"):
            workspace.data_generator.manual_seed(seed)
        written = workspace.save_checkpoint(path=output)

    parts = [f"LR schedule at step {global_step}"]
    if workspace.ema_model is not None:
        parts.append(f"EMA step counter {global_step}")
    parts += ["empty top-k ranking", f"RNG seeded from training.seed={seed}"]
    rebuilt = (
        f"not in the original's file, so rebuilt as a fresh run at epoch {epoch} would have them: "
        + ", ".join(parts)
    )
    return ConversionResult(
        output=written,
        workspace=workspace_target,
        policy=policy_target,
        original_epoch=original.epoch,
        original_global_step=original.global_step,
        epoch=epoch,
        global_step=global_step,
        seed=seed,
        rebuilt=rebuilt,
    )


def convert_checkpoint_file(source: str | Path, output: str | Path) -> ConversionResult:
    """Read the original's checkpoint ``source`` safely and write it as this framework's ``output``."""
    return convert_original_checkpoint(read_original_checkpoint(source), output, source=source)
