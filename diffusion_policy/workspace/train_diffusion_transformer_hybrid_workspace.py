"""Workspace for ``DiffusionTransformerHybridImagePolicy`` (PushT from images, DP-T).

The same recipe as the image UNet (``TrainDiffusionWorkspace.run``); only the optimizer differs: the policy
builds AdamW from ``cfg.optimizer`` (transformer_weight_decay, obs_encoder_weight_decay, learning_rate, betas)
with the transformer's weight-decay groups plus one group for the observation encoder, as in the original.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from diffusion_policy.workspace.train_diffusion_unet_hybrid_workspace import TrainDiffusionUnetHybridWorkspace
from diffusion_policy.workspace.train_diffusion_workspace import build_policy_optimizer


class TrainDiffusionTransformerHybridWorkspace(TrainDiffusionUnetHybridWorkspace):
    def build_optimizer(self, cfg: DictConfig) -> torch.optim.Optimizer:
        return build_policy_optimizer(self.model, cfg.optimizer)
