"""Workspace for ``DiffusionTransformerLowdimPolicy`` (PushT from keypoints, DP-T).

The same recipe as the state UNet (``TrainDiffusionWorkspace.run``); only the optimizer differs: the policy
builds AdamW with the transformer's weight-decay groups from ``cfg.optimizer`` (learning_rate, weight_decay,
betas), as in the original.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from diffusion_policy.workspace.train_diffusion_unet_lowdim_workspace import TrainDiffusionUnetLowdimWorkspace
from diffusion_policy.workspace.train_diffusion_workspace import build_policy_optimizer


class TrainDiffusionTransformerLowdimWorkspace(TrainDiffusionUnetLowdimWorkspace):
    def build_optimizer(self, cfg: DictConfig) -> torch.optim.Optimizer:
        return build_policy_optimizer(self.model, cfg.optimizer)
