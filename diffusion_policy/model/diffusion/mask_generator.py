"""Inpainting masks: which entries of a (B, T, action_dim + obs_dim) trajectory are given, not generated."""

from __future__ import annotations

import torch

from diffusion_policy.model.common.module_attr_mixin import ModuleAttrMixin


class LowdimMaskGenerator(ModuleAttrMixin):
    """True marks a known (conditioning) entry.

    The obs channels (``d >= action_dim``) of the first ``n_obs`` steps are known; ``n_obs`` is
    ``max_n_obs_steps`` when ``fix_obs_steps`` else uniform in [1, max_n_obs_steps] per sample.
    With ``action_visible`` the actions of the first ``n_obs - 1`` steps are known too.
    With ``obs_dim=0`` (observations as conditioning) and no visible actions the mask is all False.
    """

    def __init__(
        self,
        action_dim: int,
        obs_dim: int,
        max_n_obs_steps: int = 2,
        fix_obs_steps: bool = True,
        action_visible: bool = False,
    ) -> None:
        super().__init__()
        self.action_dim = action_dim
        self.obs_dim = obs_dim
        self.max_n_obs_steps = max_n_obs_steps
        self.fix_obs_steps = fix_obs_steps
        self.action_visible = action_visible

    @torch.no_grad()
    def forward(self, shape: tuple[int, int, int], seed: int | None = None) -> torch.Tensor:
        """shape: (B, T, D) with D == action_dim + obs_dim -> bool mask (B, T, D) on this module's device."""
        device = self.device
        batch, horizon, dim = shape
        if dim != self.action_dim + self.obs_dim:
            raise ValueError(
                f"LowdimMaskGenerator: last dim {dim} != action_dim {self.action_dim} "
                f"+ obs_dim {self.obs_dim}"
            )
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)

        if self.fix_obs_steps:
            obs_steps = torch.full((batch,), self.max_n_obs_steps, device=device)
        else:
            obs_steps = torch.randint(
                1, self.max_n_obs_steps + 1, (batch,), generator=generator, device=device
            )
        steps = torch.arange(horizon, device=device)
        is_action_dim = torch.arange(dim, device=device) < self.action_dim
        obs_time = steps[None, :] < obs_steps[:, None]  # (B, T)
        mask = obs_time[:, :, None] & ~is_action_dim[None, None, :]
        if self.action_visible:
            action_time = steps[None, :] < (obs_steps[:, None] - 1)
            mask = mask | (action_time[:, :, None] & is_action_dim[None, None, :])
        return mask
