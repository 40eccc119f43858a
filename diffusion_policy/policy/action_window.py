"""Which part of the denoised trajectory a policy predicts and which actions it executes."""

from __future__ import annotations

from dataclasses import dataclass

from diffusion_policy.common.rules import action_window_fits, enforce


@dataclass(frozen=True)
class ActionWindow:
    """T = ``horizon`` predicted steps, To = ``n_obs_steps`` observed, Ta = ``n_action_steps`` executed from
    index ``action_start`` (To - 1 with the original's ``oa_step_convention``, else To), actions in the first
    ``action_dim`` channels; with ``pred_action_steps_only`` only the Ta executed steps are denoised.

    Built with the config check's own rule (:func:`diffusion_policy.common.rules.action_window_fits`), so a
    window that does not fit fails here with the same words.
    """

    horizon: int
    n_obs_steps: int
    n_action_steps: int
    action_dim: int
    oa_step_convention: bool = True
    pred_action_steps_only: bool = False

    def __post_init__(self) -> None:
        enforce(
            action_window_fits(
                self.horizon, self.n_obs_steps, self.n_action_steps, 0, self.oa_step_convention
            )
        )

    @property
    def action_start(self) -> int:
        return self.n_obs_steps - 1 if self.oa_step_convention else self.n_obs_steps

    @property
    def sample_length(self) -> int:
        """L: the length of the denoised trajectory."""
        return self.n_action_steps if self.pred_action_steps_only else self.horizon
