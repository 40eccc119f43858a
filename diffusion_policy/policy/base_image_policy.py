"""Interface every image-observation policy implements."""

from __future__ import annotations

import torch

from diffusion_policy.model.common.module_attr_mixin import ModuleAttrMixin
from diffusion_policy.model.common.normalizer import LinearNormalizer


class BaseImagePolicy(ModuleAttrMixin):
    """Takes raw observations and returns raw actions; normalization lives inside.

    Observation keys and shapes come from ``shape_meta["obs"]``; each value is (B, To, *shape).
    """

    def predict_action(self, obs_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """obs_dict[key]: (B, To, *shape) -> {"action": (B, Ta, Da), "action_pred": (B, T, Da)}."""
        raise NotImplementedError

    def reset(self) -> None:
        """Clear any per-episode state (observation/action queues of the online interface)."""

    def compute_loss(self, batch: dict) -> torch.Tensor:
        """batch: {"obs": {key: (B, T, *shape)}, "action": (B, T, Da)} -> scalar loss."""
        raise NotImplementedError

    def set_normalizer(self, normalizer: LinearNormalizer) -> None:
        raise NotImplementedError
