"""Evaluates image PushT policies on seeded episodes, in parallel, with mp4 videos."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np

from diffusion_policy.env.pusht.pusht_image_env import PushTImageEnv
from diffusion_policy.env_runner.base_image_runner import BaseImageRunner
from diffusion_policy.env_runner.pusht_runner import PushTRunner, evaluation_env
from diffusion_policy.gym_util.multistep_wrapper import MultiStepWrapper


def make_image_episode_env(legacy: bool, render_size: int, **window: Any) -> MultiStepWrapper:
    """One evaluation episode env: the image env in ``evaluation_env`` (``window``: its video and
    multi-step settings)."""
    return evaluation_env(PushTImageEnv(legacy=legacy, render_size=render_size), **window)


class PushTImageRunner(PushTRunner, BaseImageRunner):
    """Rolls an image policy out on ``n_train`` train seeds and ``n_test`` test seeds (the arguments, with
    the original's names and defaults, are :class:`PushTRunner`'s).

    Policy input per call: ``{"image": float32 (B, To, 3, S, S) in [0, 1], "agent_pos": float32
    (B, To, 2)}`` (S = render_size, To = n_obs_steps), plus ``past_action`` (B, To-1, 2) when
    ``past_action=True``. Returned keys as :class:`PushTKeypointsRunner` (videos show the action
    marker, observations do not).
    """

    def _episode_env_fn(self, **settings: Any) -> Callable[[], gym.Env]:
        return functools.partial(make_image_episode_env, **settings)

    @staticmethod
    def _obs_to_policy(obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"image": obs["image"].astype(np.float32), "agent_pos": obs["agent_pos"].astype(np.float32)}
