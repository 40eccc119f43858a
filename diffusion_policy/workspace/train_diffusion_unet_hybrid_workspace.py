"""Workspace for ``DiffusionUnetHybridImagePolicy`` (PushT from images).

The loop lives in ``TrainDiffusionWorkspace``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from omegaconf import DictConfig

from diffusion_policy.common.errors import ConfigError
from diffusion_policy.dataset.base_dataset import BaseImageDataset
from diffusion_policy.workspace.train_diffusion_workspace import TrainDiffusionWorkspace, check_shape


class TrainDiffusionUnetHybridWorkspace(TrainDiffusionWorkspace):
    dataset_base: ClassVar[type] = BaseImageDataset

    def check_dataset(self, dataset, cfg: DictConfig) -> None:
        """Sample: {"obs": {key: (T or To, *shape_meta.obs[key].shape)}, "action": (T, *action shape)}."""
        super().check_dataset(dataset, cfg)
        shape_meta = cfg.shape_meta
        sample = dataset[0]
        obs = sample.get("obs")
        if not isinstance(obs, dict):
            raise ConfigError("image dataset samples must be {'obs': {key: tensor}, 'action': tensor}")
        expected_keys, actual_keys = set(shape_meta.obs.keys()), set(obs.keys())
        if expected_keys != actual_keys:
            raise ConfigError(
                f"dataset obs keys {sorted(actual_keys)} differ from shape_meta.obs keys "
                f"{sorted(expected_keys)}; "
                "fix task.shape_meta or the dataset"
            )
        for key, meta in shape_meta.obs.items():
            check_shape(tuple(obs[key].shape[1:]), tuple(meta.shape), f"obs '{key}'")
        check_shape(tuple(sample["action"].shape[1:]), tuple(shape_meta.action.shape), "action")

    def sampling_obs(self, batch: dict[str, Any]) -> dict[str, Any]:
        return batch["obs"]
