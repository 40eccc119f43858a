"""Interface every low-dimensional (state/keypoint) policy implements."""

from __future__ import annotations

import torch

from diffusion_policy.model.common.module_attr_mixin import ModuleAttrMixin
from diffusion_policy.model.common.normalizer import LinearNormalizer


class BaseLowdimPolicy(ModuleAttrMixin):
    """Takes raw observations and returns raw actions; normalization lives inside.

    Keys: ``obs`` (B, To, Do) and, where a policy supports it, ``obs_mask``.
    """

    def predict_action(self, obs_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """obs_dict["obs"]: (B, To, Do) -> {"action": (B, Ta, Da), "action_pred": (B, T, Da)}."""
        raise NotImplementedError

    def reset(self) -> None:
        """Clear any per-episode state (observation/action queues of the online interface)."""

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """batch: obs (B, T, Do), action (B, T, Da) -> scalar loss."""
        raise NotImplementedError

    def set_normalizer(self, normalizer: LinearNormalizer) -> None:
        raise NotImplementedError
