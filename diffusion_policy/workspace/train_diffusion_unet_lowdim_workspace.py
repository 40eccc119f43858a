"""Workspace for ``DiffusionUnetLowdimPolicy`` (PushT from keypoints).

The loop lives in ``TrainDiffusionWorkspace``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from diffusion_policy.common.errors import ConfigError
from diffusion_policy.dataset.base_dataset import BaseLowdimDataset
from diffusion_policy.workspace.train_diffusion_workspace import TrainDiffusionWorkspace, check_shape


class TrainDiffusionUnetLowdimWorkspace(TrainDiffusionWorkspace):
    dataset_base: ClassVar[type] = BaseLowdimDataset

    def check_dataset(self, dataset, cfg: DictConfig) -> None:
        """A sample is {"obs": (T, obs_dim), "action": (T, action_dim)}."""
        super().check_dataset(dataset, cfg)
        sample = dataset[0]
        if not {"obs", "action"} <= set(sample):
            raise ConfigError(
                f"lowdim dataset samples must have keys 'obs' and 'action', got {sorted(sample)}"
            )
        check_shape(tuple(sample["obs"].shape[1:]), (int(cfg.obs_dim),), "obs")
        check_shape(tuple(sample["action"].shape[1:]), (int(cfg.action_dim),), "action")

    def sampling_obs(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"obs": batch["obs"]}

    def action_mse(self, result: dict[str, torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        if self.cfg.get("pred_action_steps_only", False):
            # only the executed window [To-1, To-1+Ta) is predicted
            start = self.cfg.n_obs_steps - 1
            end = start + self.cfg.n_action_steps
            return F.mse_loss(result["action"], batch["action"][:, start:end])
        return super().action_mse(result, batch)
