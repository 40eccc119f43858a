"""Workspace for ``DiffusionUnetImagePolicy`` (the original's pure-torch image recipe).

The recipe is the hybrid image one (same dataset checks, sampling batch and loop); only the policy in the
config differs.
"""

from __future__ import annotations

from diffusion_policy.workspace.train_diffusion_unet_hybrid_workspace import TrainDiffusionUnetHybridWorkspace


class TrainDiffusionUnetImageWorkspace(TrainDiffusionUnetHybridWorkspace):
    pass
