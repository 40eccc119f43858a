"""Evaluates low-dim (keypoint) PushT policies on seeded episodes, in parallel, with mp4 videos."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from diffusion_policy.common.rules import enforce, rollout_seeds_in_range
from diffusion_policy.env.pusht.pusht_keypoints_env import PushTKeypointsEnv
from diffusion_policy.env_runner.base_lowdim_runner import BaseLowdimRunner
from diffusion_policy.env_runner.vector_rollout import EpisodePlan, SeededEpisodeRunner
from diffusion_policy.gym_util.multistep_wrapper import MultiStepWrapper
from diffusion_policy.gym_util.video_recorder import VideoRecorder
from diffusion_policy.gym_util.video_recording_wrapper import VideoRecordingWrapper


def make_keypoints_episode_env(
    legacy: bool,
    keypoint_visible_rate: float,
    agent_keypoints: bool,
    render_size: int,
    fps: int,
    crf: int,
    n_obs_steps: int,
    n_action_steps: int,
    max_steps: int,
) -> MultiStepWrapper:
    """One evaluation episode env: keypoints env -> video recorder -> multi-step wrapper."""
    env = PushTKeypointsEnv(
        legacy=legacy,
        keypoint_visible_rate=keypoint_visible_rate,
        agent_keypoints=agent_keypoints,
        render_size=render_size,
        **PushTKeypointsEnv.generate_keypoint_manager_params(),
    )
    env = VideoRecordingWrapper(
        env, VideoRecorder.create_h264(fps=fps, crf=crf), steps_per_render=max(10 // fps, 1)
    )
    return MultiStepWrapper(
        env, n_obs_steps=n_obs_steps, n_action_steps=n_action_steps, max_episode_steps=max_steps
    )


def check_runner_args(**kwargs: Any) -> None:
    """Shared constructor checks of the PushT runners (one-line ValueErrors naming the argument)."""
    for name in ("n_train", "n_train_vis", "n_test", "n_test_vis", "n_latency_steps"):
        if name in kwargs and (not isinstance(kwargs[name], int | np.integer) or kwargs[name] < 0):
            raise ValueError(f"{name} must be an int >= 0, got {kwargs[name]!r}")
    for name in ("max_steps", "n_obs_steps", "n_action_steps", "fps", "render_size"):
        if name in kwargs and (not isinstance(kwargs[name], int | np.integer) or kwargs[name] < 1):
            raise ValueError(f"{name} must be an int >= 1, got {kwargs[name]!r}")
    seeds = (kwargs[k] for k in ("n_train", "n_test", "train_start_seed", "test_start_seed"))
    enforce(rollout_seeds_in_range(*seeds))


class PushTKeypointsRunner(SeededEpisodeRunner, BaseLowdimRunner):
    """Rolls a low-dim policy out on ``n_train`` train seeds and ``n_test`` test seeds.

    Policy input per call: ``{"obs": float32 (B, To, Do), "obs_mask": bool (B, To, Do)}`` with
    To = n_obs_steps, Do = 20 (or 24 with agent_keypoints), plus ``past_action`` (B, To-1, 2) when
    ``past_action=True``. With ``n_latency_steps`` the env keeps To + latency observations, the policy
    gets the oldest To, and the first ``n_latency_steps`` returned actions are dropped.
    ``run(policy)`` returns ``{prefix}sim_max_reward_{seed}`` (float), ``{prefix}sim_video_{seed}``
    (str path of an mp4 under ``output_dir/media``), ``{prefix}mean_score`` and
    ``{prefix}success_rate`` for prefix in ``train/``, ``test/``.
    """

    def __init__(
        self,
        output_dir: str,
        keypoint_visible_rate: float = 1.0,
        n_train: int = 10,
        n_train_vis: int = 3,
        train_start_seed: int = 0,
        n_test: int = 22,
        n_test_vis: int = 6,
        legacy_test: bool = False,
        test_start_seed: int = 10000,
        max_steps: int = 200,
        n_obs_steps: int = 8,
        n_action_steps: int = 8,
        n_latency_steps: int = 0,
        fps: int = 10,
        crf: int = 22,
        agent_keypoints: bool = False,
        past_action: bool = False,
        tqdm_interval_sec: float = 5.0,
        n_envs: int | None = None,
        render_size: int = 96,
        step_timeout_s: float = 300.0,
    ):
        super().__init__(output_dir)
        check_runner_args(
            n_train=n_train, n_train_vis=n_train_vis, n_test=n_test, n_test_vis=n_test_vis,
            train_start_seed=train_start_seed, test_start_seed=test_start_seed,
            n_latency_steps=n_latency_steps, max_steps=max_steps, n_obs_steps=n_obs_steps,
            n_action_steps=n_action_steps, fps=fps, render_size=render_size,
        )  # fmt: skip
        if not 0.0 <= keypoint_visible_rate <= 1.0:
            raise ValueError(f"keypoint_visible_rate must be in [0, 1], got {keypoint_visible_rate!r}")
        self.n_obs_steps = int(n_obs_steps)
        self.n_action_steps = int(n_action_steps)
        self.n_latency_steps = int(n_latency_steps)
        self.past_action = bool(past_action)
        self.obs_dim = (9 + (3 if agent_keypoints else 1)) * 2
        env_fn = functools.partial(
            make_keypoints_episode_env,
            legacy=bool(legacy_test),
            keypoint_visible_rate=float(keypoint_visible_rate),
            agent_keypoints=bool(agent_keypoints),
            render_size=int(render_size),
            fps=int(fps),
            crf=int(crf),
            n_obs_steps=self.n_obs_steps + self.n_latency_steps,
            n_action_steps=self.n_action_steps,
            max_steps=int(max_steps),
        )
        plan = EpisodePlan(
            output_dir, n_train, n_train_vis, train_start_seed, n_test, n_test_vis, test_start_seed
        )
        self._init_rollout(plan, env_fn, n_envs, step_timeout_s, tqdm_interval_sec)

    def _obs_to_policy(self, obs: np.ndarray) -> dict[str, np.ndarray]:
        obs = obs[:, : self.n_obs_steps]
        return {
            "obs": obs[..., : self.obs_dim].astype(np.float32),
            "obs_mask": obs[..., self.obs_dim :] > 0.5,
        }

    def _action_from_policy(self, action: np.ndarray) -> np.ndarray:
        return action[:, self.n_latency_steps :]
