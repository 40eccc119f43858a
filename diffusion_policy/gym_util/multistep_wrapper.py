"""Observation history + action chunks on top of a single-step env."""

from __future__ import annotations

from collections import deque
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

REWARD_AGGREGATIONS = {"max": np.max, "min": np.min, "mean": np.mean, "sum": np.sum}


def repeated_space(space: spaces.Space, n: int) -> spaces.Space:
    """``space`` with a new leading axis of length ``n`` (Box, or Dict of Boxes)."""
    if isinstance(space, spaces.Box):
        low = np.repeat(space.low[None], n, axis=0)
        high = np.repeat(space.high[None], n, axis=0)
        return spaces.Box(low=low, high=high, shape=(n, *space.shape), dtype=space.dtype)
    if isinstance(space, spaces.Dict):
        return spaces.Dict({k: repeated_space(v, n) for k, v in space.spaces.items()})
    raise TypeError(f"cannot stack observations of space {space!r}; use Box or Dict of Box")


def stack_last_n(history: deque, n: int):
    """Last ``n`` entries stacked on a new leading axis, left-padded by repeating the oldest one."""
    items = list(history)[-n:]
    items = [items[0]] * (n - len(items)) + items
    if isinstance(items[0], dict):
        return {k: np.stack([x[k] for x in items]) for k in items[0]}
    return np.stack(items)


class MultiStepWrapper(gym.Wrapper):
    """Runs an action chunk per ``step`` and returns the last ``n_obs_steps`` observations.

    - ``reset`` returns the first observation repeated ``n_obs_steps`` times (same padding as the
      training windows that start before the episode).
    - ``step(actions (k, Da))`` executes the k actions in order and stops early when the episode
      ends (termination, or ``max_episode_steps`` env steps -> truncated).
    - The reward is ``reward_agg_method`` (default max) over every step of the episode so far, so
      the last reward of an episode is its max reward. ``self.reward`` holds the per-step rewards.
    - ``info`` is the last inner step's info. Stepping a finished episode raises.
    """

    def __init__(
        self,
        env: gym.Env,
        n_obs_steps: int,
        n_action_steps: int,
        max_episode_steps: int | None = None,
        reward_agg_method: str = "max",
    ):
        super().__init__(env)
        if n_obs_steps < 1 or n_action_steps < 1:
            raise ValueError(
                f"n_obs_steps and n_action_steps must be >= 1, got {n_obs_steps}, {n_action_steps}"
            )
        if max_episode_steps is not None and max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be >= 1 or None, got {max_episode_steps}")
        if reward_agg_method not in REWARD_AGGREGATIONS:
            raise ValueError(
                f"reward_agg_method must be one of {sorted(REWARD_AGGREGATIONS)}, got {reward_agg_method!r}"
            )
        self.n_obs_steps = int(n_obs_steps)
        self.n_action_steps = int(n_action_steps)
        self.max_episode_steps = max_episode_steps
        self.reward_agg = REWARD_AGGREGATIONS[reward_agg_method]
        self.observation_space = repeated_space(env.observation_space, self.n_obs_steps)
        self.action_space = repeated_space(env.action_space, self.n_action_steps)
        self.obs: deque = deque(maxlen=self.n_obs_steps)
        self.reward: list[float] = []
        self.done = False

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        self.obs.clear()
        self.obs.append(obs)
        self.reward = []
        self.done = False
        return stack_last_n(self.obs, self.n_obs_steps), info

    def step(self, action):
        if self.done:
            raise RuntimeError("MultiStepWrapper.step() after the episode ended; call reset() first")
        actions = np.asarray(action)
        if actions.ndim < 2 or len(actions) == 0:
            raise ValueError(
                f"expected an action chunk of shape (n_steps, action_dim), got shape {actions.shape}"
            )
        terminated = truncated = False
        info: dict[str, Any] = {}
        for act in actions:
            obs, reward, terminated, truncated, info = self.env.step(act)
            self.obs.append(obs)
            self.reward.append(float(reward))
            if self.max_episode_steps is not None and len(self.reward) >= self.max_episode_steps:
                truncated = True
            if terminated or truncated:
                self.done = True
                break
        reward = float(self.reward_agg(self.reward))
        return stack_last_n(self.obs, self.n_obs_steps), reward, bool(terminated), bool(truncated), info

    def get_rewards(self) -> list[float]:
        return list(self.reward)
