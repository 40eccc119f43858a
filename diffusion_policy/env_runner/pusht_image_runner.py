"""Evaluates image PushT policies on seeded episodes, in parallel, with mp4 videos."""

from __future__ import annotations

import functools

import numpy as np

from diffusion_policy.env.pusht.pusht_image_env import PushTImageEnv
from diffusion_policy.env_runner.base_image_runner import BaseImageRunner
from diffusion_policy.env_runner.pusht_keypoints_runner import check_runner_args
from diffusion_policy.env_runner.vector_rollout import EpisodePlan, SeededEpisodeRunner
from diffusion_policy.gym_util.multistep_wrapper import MultiStepWrapper
from diffusion_policy.gym_util.video_recorder import VideoRecorder
from diffusion_policy.gym_util.video_recording_wrapper import VideoRecordingWrapper


def make_image_episode_env(
    legacy: bool, render_size: int, fps: int, crf: int, n_obs_steps: int, n_action_steps: int, max_steps: int
) -> MultiStepWrapper:
    """One evaluation episode env: image env -> video recorder -> multi-step wrapper."""
    env = PushTImageEnv(legacy=legacy, render_size=render_size)
    env = VideoRecordingWrapper(
        env, VideoRecorder.create_h264(fps=fps, crf=crf), steps_per_render=max(10 // fps, 1)
    )
    return MultiStepWrapper(
        env, n_obs_steps=n_obs_steps, n_action_steps=n_action_steps, max_episode_steps=max_steps
    )


class PushTImageRunner(SeededEpisodeRunner, BaseImageRunner):
    """Rolls an image policy out on ``n_train`` train seeds and ``n_test`` test seeds.

    Policy input per call: ``{"image": float32 (B, To, 3, S, S) in [0, 1], "agent_pos": float32
    (B, To, 2)}`` (S = render_size, To = n_obs_steps), plus ``past_action`` (B, To-1, 2) when
    ``past_action=True``. Returned keys as :class:`PushTKeypointsRunner` (videos show the action
    marker, observations do not).
    """

    def __init__(
        self,
        output_dir: str,
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
        fps: int = 10,
        crf: int = 22,
        render_size: int = 96,
        past_action: bool = False,
        tqdm_interval_sec: float = 5.0,
        n_envs: int | None = None,
        step_timeout_s: float = 300.0,
    ):
        super().__init__(output_dir)
        check_runner_args(
            n_train=n_train, n_train_vis=n_train_vis, n_test=n_test, n_test_vis=n_test_vis,
            train_start_seed=train_start_seed, test_start_seed=test_start_seed, max_steps=max_steps,
            n_obs_steps=n_obs_steps, n_action_steps=n_action_steps, fps=fps, render_size=render_size,
        )  # fmt: skip
        self.n_obs_steps = int(n_obs_steps)
        self.n_action_steps = int(n_action_steps)
        self.past_action = bool(past_action)
        env_fn = functools.partial(
            make_image_episode_env,
            legacy=bool(legacy_test),
            render_size=int(render_size),
            fps=int(fps),
            crf=int(crf),
            n_obs_steps=self.n_obs_steps,
            n_action_steps=self.n_action_steps,
            max_steps=int(max_steps),
        )
        plan = EpisodePlan(
            output_dir, n_train, n_train_vis, train_start_seed, n_test, n_test_vis, test_start_seed
        )
        self._init_rollout(plan, env_fn, n_envs, step_timeout_s, tqdm_interval_sec)

    @staticmethod
    def _obs_to_policy(obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"image": obs["image"].astype(np.float32), "agent_pos": obs["agent_pos"].astype(np.float32)}
