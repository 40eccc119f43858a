"""Evaluates low-dim (keypoint) PushT policies on seeded episodes, in parallel, with mp4 videos."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np

from diffusion_policy.env.pusht.pusht_keypoints_env import PushTKeypointsEnv
from diffusion_policy.env_runner.base_lowdim_runner import BaseLowdimRunner
from diffusion_policy.env_runner.pusht_runner import PushTRunner, check_count, evaluation_env
from diffusion_policy.gym_util.multistep_wrapper import MultiStepWrapper


def make_keypoints_episode_env(
    legacy: bool, keypoint_visible_rate: float, agent_keypoints: bool, render_size: int, **window: Any
) -> MultiStepWrapper:
    """One evaluation episode env: the keypoints env in ``evaluation_env`` (``window``: its video and
    multi-step settings)."""
    env = PushTKeypointsEnv(
        legacy=legacy,
        keypoint_visible_rate=keypoint_visible_rate,
        agent_keypoints=agent_keypoints,
        render_size=render_size,
        **PushTKeypointsEnv.generate_keypoint_manager_params(),
    )
    return evaluation_env(env, **window)


class PushTKeypointsRunner(PushTRunner, BaseLowdimRunner):
    """Rolls a low-dim policy out on ``n_train`` train seeds and ``n_test`` test seeds.

    Policy input per call: ``{"obs": float32 (B, To, Do), "obs_mask": bool (B, To, Do)}`` with
    To = n_obs_steps, Do = 20 (or 24 with agent_keypoints), plus ``past_action`` (B, To-1, 2) when
    ``past_action=True``. With ``n_latency_steps`` the env keeps To + latency observations, the policy
    gets the oldest To, and the first ``n_latency_steps`` returned actions are dropped.
    ``run(policy)`` returns ``{prefix}sim_max_reward_{seed}`` (float), ``{prefix}sim_video_{seed}``
    (str path of an mp4 under ``output_dir/media``), ``{prefix}mean_score`` and
    ``{prefix}success_rate`` for prefix in ``train/``, ``test/``.

    ``protocol``: the rollout arguments of :class:`PushTRunner` (``n_train``, ``n_test``, seeds,
    ``max_steps``, ``n_obs_steps``, ``n_action_steps``, ``fps``, ``crf``, ``render_size``, ...), with the
    original's names and defaults; the keypoint-only arguments are keyword-only, so that an argument the
    original passed by position after ``keypoint_visible_rate`` fails loudly rather than landing elsewhere.
    """

    def __init__(
        self,
        output_dir: str,
        keypoint_visible_rate: float = 1.0,
        *,
        n_latency_steps: int = 0,
        agent_keypoints: bool = False,
        **protocol: Any,
    ):
        check_count("n_latency_steps", n_latency_steps, 0)
        if not 0.0 <= keypoint_visible_rate <= 1.0:
            raise ValueError(f"keypoint_visible_rate must be in [0, 1], got {keypoint_visible_rate!r}")
        self.keypoint_visible_rate = float(keypoint_visible_rate)
        self.agent_keypoints = bool(agent_keypoints)
        self.n_latency_steps = int(n_latency_steps)
        self.obs_dim = (9 + (3 if agent_keypoints else 1)) * 2
        super().__init__(output_dir, **protocol)

    def _episode_env_fn(self, n_obs_steps: int, **settings: Any) -> Callable[[], gym.Env]:
        return functools.partial(
            make_keypoints_episode_env,
            keypoint_visible_rate=self.keypoint_visible_rate,
            agent_keypoints=self.agent_keypoints,
            n_obs_steps=n_obs_steps + self.n_latency_steps,
            **settings,
        )

    def _obs_to_policy(self, obs: np.ndarray) -> dict[str, np.ndarray]:
        obs = obs[:, : self.n_obs_steps]
        return {
            "obs": obs[..., : self.obs_dim].astype(np.float32),
            "obs_mask": obs[..., self.obs_dim :] > 0.5,
        }

    def _action_from_policy(self, action: np.ndarray) -> np.ndarray:
        return action[:, self.n_latency_steps :]
