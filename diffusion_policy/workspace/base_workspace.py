"""Workspace: owns the config, the output directory and everything a checkpoint must hold.

A checkpoint (see ``diffusion_policy.common.checkpoint_io``) stores the fully resolved config as YAML plus the
``state_dict()`` of every attribute named in ``state_attrs`` that exists, the plain values named in
``value_attrs``, and the torch / numpy / python RNG states. Nothing is pickled, so loading one is safe.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from diffusion_policy.common.checkpoint_io import (
    load_checkpoint_file,
    remove_stale_temp_files,
    save_checkpoint_file,
)
from diffusion_policy.common.errors import CheckpointError, one_line
from diffusion_policy.common.optimizer_state import place_by_name, with_param_names


class BaseWorkspace:
    # attributes whose state_dict() goes into checkpoints (skipped while None)
    state_attrs: ClassVar[tuple[str, ...]] = ()
    # attributes holding plain values (int, float, str, None, dicts/lists of those)
    value_attrs: ClassVar[tuple[str, ...]] = ()
    # optimizer attribute -> the module attribute that names its parameters: their state is saved with
    # parameter names and loaded by name (``optimizer_state``), never by position alone
    optimizer_modules: ClassVar[dict[str, str]] = {}

    def __init__(self, cfg: DictConfig, output_dir: str | os.PathLike | None = None):
        self.cfg = cfg
        self._output_dir = None if output_dir is None else str(output_dir)

    @property
    def output_dir(self) -> str:
        if self._output_dir is None:
            from hydra.core.hydra_config import HydraConfig

            self._output_dir = HydraConfig.get().runtime.output_dir
        return self._output_dir

    def checkpoint_path(self, tag: str = "latest") -> Path:
        return Path(self.output_dir) / "checkpoints" / f"{tag}.ckpt"

    # ----- save -----
    def save_checkpoint(self, path: str | os.PathLike | None = None, tag: str = "latest") -> Path:
        """Write all state to ``path`` (default ``<output_dir>/checkpoints/<tag>.ckpt``) atomically."""
        path = Path(path) if path is not None else self.checkpoint_path(tag)
        remove_stale_temp_files(path.parent)
        payload = {
            "cfg_yaml": OmegaConf.to_yaml(self.cfg, resolve=True),
            "state_dicts": {
                name: _to_cpu(self._state_dict_of(name))
                for name in self.state_attrs
                if getattr(self, name, None) is not None
            },
            "state": {name: getattr(self, name) for name in self.value_attrs} | {"rng": self.rng_state()},
        }
        return save_checkpoint_file(payload, path)

    def _state_dict_of(self, name: str) -> dict[str, Any]:
        state = getattr(self, name).state_dict()
        if name in self.optimizer_modules:
            state = with_param_names(state, getattr(self, name), getattr(self, self.optimizer_modules[name]))
        return state

    # ----- load -----
    def load_checkpoint(
        self,
        path: str | os.PathLike | None = None,
        tag: str = "latest",
        attrs: tuple[str, ...] | None = None,
        restore_rng: bool = True,
    ) -> dict[str, Any]:
        path = Path(path) if path is not None else self.checkpoint_path(tag)
        payload = load_checkpoint_file(path)
        self.load_payload(payload, attrs=attrs, restore_rng=restore_rng, source=str(path))
        return payload

    def load_payload(
        self,
        payload: dict[str, Any],
        attrs: tuple[str, ...] | None = None,
        restore_rng: bool = True,
        source: str = "checkpoint",
    ) -> None:
        """Restore ``attrs`` (default: every state attribute that exists here) plus the plain values."""
        names = self.state_attrs if attrs is None else attrs
        for name in names:
            target = getattr(self, name, None)
            if target is None:
                continue
            if name not in payload["state_dicts"]:
                raise CheckpointError(f"checkpoint {source} has no state for '{name}'")
            state = payload["state_dicts"][name]
            if name in self.optimizer_modules:
                module = self.optimizer_modules[name]
                state = place_by_name(
                    state,
                    target,
                    getattr(self, module),
                    saved_model_keys=payload["state_dicts"].get(module, {}).keys(),
                    source=source,
                )
            try:
                result = target.load_state_dict(state)
            except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
                detail = one_line(e)[:300]
                raise CheckpointError(
                    f"checkpoint {source}: '{name}' does not match what this code builds from the "
                    f"checkpoint's config ({detail})"
                ) from None
            if result is not None and (result.missing_keys or result.unexpected_keys):
                raise CheckpointError(
                    f"checkpoint {source}: '{name}' does not match this code: missing keys "
                    f"{list(result.missing_keys)[:5]}, unexpected keys {list(result.unexpected_keys)[:5]}"
                )
        if attrs is None:
            for name in self.value_attrs:
                if name in payload["state"]:
                    setattr(self, name, payload["state"][name])
            if restore_rng:
                self.set_rng_state(payload["state"]["rng"])

    # ----- RNG -----
    def rng_state(self) -> dict[str, Any]:
        np_state = np.random.get_state(legacy=False)
        state = {
            "python": _tuples_to_lists(random.getstate()),
            "numpy": {
                "bit_generator": np_state["bit_generator"],
                "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                "pos": int(np_state["state"]["pos"]),
                "has_gauss": int(np_state["has_gauss"]),
                "gauss": float(np_state["gauss"]),
            },
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def set_rng_state(self, state: dict[str, Any]) -> None:
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        n = state["numpy"]
        np.random.set_state(
            {
                "bit_generator": n["bit_generator"],
                "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                "has_gauss": n["has_gauss"],
                "gauss": n["gauss"],
            }
        )
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def load_policy(
    checkpoint: str | os.PathLike, device: str | torch.device = "cpu", payload: dict[str, Any] | None = None
) -> tuple[torch.nn.Module, DictConfig]:
    """The policy a checkpoint holds, in eval mode on ``device``, and the run's resolved config.

    The EMA weights are used when the run trained with ``training.use_ema`` (as rollouts and ``eval.py`` do).
    The policy is built from the checkpoint's own config, so no other file is needed::

        policy, cfg = load_policy("data/outputs/run/checkpoints/latest.ckpt")
        policy.reset()
        action = policy.select_action(obs)  # one env step; replans every n_action_steps calls
    """
    from hydra.utils import get_class

    from diffusion_policy.common.errors import ConfigError

    if payload is None:
        payload = load_checkpoint_file(checkpoint)
    cfg = OmegaConf.create(payload["cfg_yaml"])
    try:
        workspace_cls = get_class(cfg._target_)
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {checkpoint}: workspace {cfg.get('_target_')!r} not importable ({e})"
        ) from None
    try:
        workspace = workspace_cls(cfg, output_dir=str(Path(checkpoint).parent))
    except ConfigError as e:
        raise CheckpointError(
            f"checkpoint {checkpoint}: its config no longer builds with this code: {e}"
        ) from None
    policy_attr = "ema_model" if cfg.training.use_ema else "model"
    workspace.load_payload(payload, attrs=(policy_attr,), source=str(checkpoint))
    # frozen like the EMA copy rollouts use in training: inference needs no autograd state, and frozen
    # weights let torch pick the same attention kernels as there
    policy = getattr(workspace, policy_attr).to(device).eval().requires_grad_(False)
    return policy, cfg


def _to_cpu(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu")
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_cpu(v) for v in x)
    return x


def _tuples_to_lists(x: Any) -> Any:
    if isinstance(x, (tuple, list)):
        return [_tuples_to_lists(v) for v in x]
    return x
