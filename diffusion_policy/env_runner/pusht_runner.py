"""What the two PushT runners share: the rollout protocol as constructor arguments (the original runners'
names and defaults), its checks, and the evaluation wrapping of an episode env (video, observation window)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np

from diffusion_policy.common.rules import enforce, rollout_seeds_in_range
from diffusion_policy.env_runner.vector_rollout import EpisodePlan, SeededEpisodeRunner
from diffusion_policy.gym_util.multistep_wrapper import MultiStepWrapper
from diffusion_policy.gym_util.video_recorder import VideoRecorder
from diffusion_policy.gym_util.video_recording_wrapper import VideoRecordingWrapper


def check_count(name: str, value: Any, minimum: int) -> None:
    """A one-line ValueError naming the argument unless ``value`` is an int >= ``minimum``."""
    if not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def evaluation_env(
    env: gym.Env, fps: int, crf: int, n_obs_steps: int, n_action_steps: int, max_steps: int
) -> MultiStepWrapper:
    """An episode env as the runners step it: env -> video recorder -> multi-step wrapper."""
    env = VideoRecordingWrapper(
        env, VideoRecorder.create_h264(fps=fps, crf=crf), steps_per_render=max(10 // fps, 1)
    )
    return MultiStepWrapper(
        env, n_obs_steps=n_obs_steps, n_action_steps=n_action_steps, max_episode_steps=max_steps
    )


class PushTRunner(SeededEpisodeRunner):
    """Rolls a policy out on ``n_train`` seeds from ``train_start_seed`` and ``n_test`` from
    ``test_start_seed`` (the first ``n_*_vis`` of each recorded as mp4), ``max_steps`` env steps each.

    A runner defines ``_episode_env_fn``, which gets the episode env's settings (``legacy``, ``render_size``,
    ``fps``, ``crf``, ``n_obs_steps``, ``n_action_steps``, ``max_steps``) and returns a picklable factory of
    one episode env (the workers build their envs from it), and ``_obs_to_policy``.
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
        for name, value, minimum in (
            ("n_train", n_train, 0),
            ("n_train_vis", n_train_vis, 0),
            ("n_test", n_test, 0),
            ("n_test_vis", n_test_vis, 0),
            ("max_steps", max_steps, 1),
            ("n_obs_steps", n_obs_steps, 1),
            ("n_action_steps", n_action_steps, 1),
            ("fps", fps, 1),
            ("render_size", render_size, 1),
        ):
            check_count(name, value, minimum)
        enforce(rollout_seeds_in_range(n_train, n_test, train_start_seed, test_start_seed))
        self.n_obs_steps = int(n_obs_steps)
        self.n_action_steps = int(n_action_steps)
        self.past_action = bool(past_action)
        env_fn = self._episode_env_fn(
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

    def _episode_env_fn(self, **settings: Any) -> Callable[[], gym.Env]:
        raise NotImplementedError
