"""The shipped recipes as the benchmarks build them: the PushT dataset and a small copy of it for smoke runs,
configs composed from ``config/`` with Hydra's compose API, and a recipe's training step as its own workspace
runs it, so that a number always describes what ``train.py`` runs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffusion_policy.common.config_resolvers import register_resolvers
from diffusion_policy.common.device_util import resolve_device
from diffusion_policy.common.errors import DeviceError

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "config"
ZARR_RELPATH = Path("pusht") / "pusht_cchi_v7_replay.zarr"
SEED = 42


def headless_env() -> None:
    """No window, no sound device, no wandb run: set before pygame or wandb load."""
    for key, value in (
        ("SDL_VIDEODRIVER", "dummy"),
        ("SDL_AUDIODRIVER", "dummy"),
        ("WANDB_MODE", "disabled"),
        ("WANDB_SILENT", "true"),
    ):
        os.environ.setdefault(key, value)


def cli_device(name: str) -> torch.device:
    """``--device auto|cpu|cuda:N|mps`` as the training config's ``training.device`` resolves it."""
    try:
        return resolve_device(name, option="--device")
    except DeviceError as e:
        raise SystemExit(str(e)) from None


def find_pusht_zarr(explicit: str | None) -> Path:
    candidates = [Path(explicit)] if explicit else []
    if os.environ.get("PUSHT_ZARR"):
        candidates.append(Path(os.environ["PUSHT_ZARR"]))
    candidates += [REPO_ROOT / "data" / ZARR_RELPATH, REPO_ROOT.parent / "shared" / "data" / ZARR_RELPATH]
    for c in candidates:
        if (c / "meta" / "episode_ends").exists():
            return c.resolve()
    raise SystemExit(
        "PushT dataset not found: pass --zarr PATH, set PUSHT_ZARR, or link "
        "data/pusht/pusht_cchi_v7_replay.zarr"
    )


def write_subset_zarr(src: Path, dst: Path, n_episodes: int) -> Path:
    """Copy the first ``n_episodes`` of the real dataset into a small zarr v2 store (smoke mode only)."""
    import zarr

    root = zarr.open_group(str(src), mode="r")
    ends = np.asarray(root["meta/episode_ends"][:])[:n_episodes]
    n = int(ends[-1])
    out = zarr.open_group(str(dst), mode="w", zarr_format=2)
    out.create_group("meta").create_array("episode_ends", data=ends.astype(np.int64))
    data = out.create_group("data")
    for key in root["data"].array_keys():
        arr = np.asarray(root["data"][key][:n])
        data.create_array(key, data=arr, chunks=(min(n, 161),) + arr.shape[1:])
    return dst


def compose_recipe(config_name: str, overrides: list[str]) -> Any:
    """``config/<config_name>.yaml`` with Hydra ``overrides``, composed as ``train.py`` composes it."""
    from hydra import compose, initialize_config_dir

    if not (CONFIG_DIR / f"{config_name}.yaml").exists():
        raise SystemExit(f"recipe config {config_name}.yaml not found under {CONFIG_DIR}")
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name=config_name, overrides=overrides)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def endless(loader: Any) -> Iterator[Any]:
    """The loader's batches, epoch after epoch."""
    while True:
        yield from loader


@dataclass
class RecipeTraining:
    """A recipe's training step as ``train.py`` runs it: the workspace class the config names builds the
    policy, its EMA copy, the optimizer, the LR schedule and the EMA, and :meth:`step` is the workspace's
    own ``train_step`` (batch to the device, loss under the recipe's autocast, backward, optimizer and LR
    step, EMA update)."""

    workspace: Any
    train_module: torch.nn.Module
    device: torch.device
    autocast: Any
    accumulate_every: int
    batches_done: int = 0

    @classmethod
    def build(
        cls,
        cfg: Any,
        dataset: Any,
        device: torch.device,
        output_dir: Path,
        loader_changes: dict | None = None,
    ) -> tuple[RecipeTraining, torch.utils.data.DataLoader]:
        """The workspace of ``cfg`` (which seeds ``training.seed`` first, as a run does) on ``device``, and
        its training ``DataLoader`` over ``dataset`` with ``loader_changes`` applied to ``cfg.dataloader``."""
        from hydra.utils import get_class

        from diffusion_policy.common import distributed
        from diffusion_policy.common.pytorch_util import training_autocast

        workspace = get_class(cfg._target_)(cfg, output_dir=str(output_dir))
        workspace.set_normalizer(dataset.get_normalizer())
        training = cls(
            workspace,
            workspace.training_module(cfg, device, distributed.DistInfo()),
            device,
            training_autocast(device, cfg.training.get("mixed_precision")),
            int(cfg.training.gradient_accumulate_every),
        )
        loader = training.loader(dataset, **(loader_changes or {}))
        workspace.build_lr_scheduler_and_ema(cfg, len(loader))
        workspace.to_device(device)
        workspace.model.train()
        return training, loader

    @property
    def model(self) -> torch.nn.Module:
        return self.workspace.model

    def loader(self, dataset: Any, **changes: Any) -> torch.utils.data.DataLoader:
        """The workspace's training loader (its shuffling generator, pinning only for CUDA) with
        ``changes`` (e.g. ``num_workers=0``) applied to the recipe's ``dataloader`` block."""
        from omegaconf import OmegaConf

        from diffusion_policy.common import distributed

        node = OmegaConf.merge(self.workspace.cfg.dataloader, changes)
        return self.workspace.make_loader(dataset, node, self.device, distributed.DistInfo(), train=True)

    def step(self, batch: dict) -> torch.Tensor:
        """One training iteration on a CPU batch; returns the loss tensor (not read back)."""
        loss = self.workspace.train_step(
            self.train_module, batch, self.device, self.autocast, self.batches_done, self.accumulate_every
        )
        self.batches_done += 1
        return loss
