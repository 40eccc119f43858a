"""Parallel closed-loop rollouts shared by the PushT runners.

Layout: all episodes of a ``run`` are simulated at the same time, spread in contiguous chunks over
``n_envs`` gymnasium vector-env workers (processes, or in-process for ``n_envs=1``); each worker
hosts an :class:`EpisodeChunkEnv` that steps its chunk of episodes one after another. The policy
therefore sees one large batch per control step (good for GPUs) while only ``n_envs`` processes
exist. Finished episodes are sliced out of the policy batch and are no longer stepped.

Because the batch handed to the policy holds the active episodes in the same global order whatever
``n_envs`` is, per-episode results do not depend on ``n_envs`` for any policy whose output depends
only on its input batch.
"""

from __future__ import annotations

import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import tqdm
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv

from diffusion_policy.common import shutdown
from diffusion_policy.common.chunk_execution import ChunkExecutor, ExecutionSpec
from diffusion_policy.common.errors import WorkerDiedError
from diffusion_policy.common.host_info import usable_cpu_count
from diffusion_policy.gym_util.multistep_wrapper import repeated_space

# forkserver: the parent usually holds torch/CUDA threads, which makes plain fork unsafe
MP_CONTEXT = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


@dataclass(frozen=True)
class Episode:
    """One rollout: env seed, metric prefix ('train/' or 'test/') and mp4 path (None: no video)."""

    seed: int
    prefix: str
    video_path: str | None = None


@dataclass
class RolloutResult:
    """Per-episode outcome, in the order of the episodes passed to ``run``."""

    max_reward: np.ndarray  # (N,) float64
    success: np.ndarray  # (N,) bool, episode terminated by coverage > 0.95
    n_steps: np.ndarray  # (N,) int, env steps executed
    video_paths: list[str | None]


def default_n_envs(n_episodes: int) -> int:
    """One worker per available core, never more than there are episodes."""
    return max(1, min(usable_cpu_count(), n_episodes))


def _slot_index(obs, idx: np.ndarray):
    if isinstance(obs, dict):
        return {k: v[idx] for k, v in obs.items()}
    return obs[idx]


def _flatten_workers(obs, n_total: int):
    """(n_envs, n_slots, ...) -> (n_envs * n_slots, ...) for arrays or dicts of arrays."""
    if isinstance(obs, dict):
        return {k: v.reshape(n_total, *v.shape[2:]) for k, v in obs.items()}
    return obs.reshape(n_total, *obs.shape[2:])


class EpisodeChunkEnv(gym.Env):
    """A worker's chunk of ``n_slots`` independent episode envs behind one gymnasium Env.

    Observation: the episode env's observation stacked over slots (n_slots, ...). Action:
    (n_slots, k, Da); rows of finished or unused slots are ignored. ``reset(options={"episodes":
    [...]})`` takes the global episode list (one :class:`Episode` or None per slot of every worker)
    and starts this worker's part. ``info`` carries per-slot ``reward`` (episode max so far),
    ``done``, ``success`` and ``n_steps``. Exceptions are re-raised as RuntimeError carrying the
    worker's traceback so the parent process can show it.
    """

    metadata = {"render_modes": []}

    def __init__(self, episode_env_fn: Callable[[], gym.Env], n_slots: int, worker_index: int = 0):
        self.n_slots = int(n_slots)
        self.worker_index = int(worker_index)
        self.envs = [episode_env_fn() for _ in range(self.n_slots)]
        self.observation_space = repeated_space(self.envs[0].observation_space, self.n_slots)
        self.action_space = repeated_space(self.envs[0].action_space, self.n_slots)
        self._obs: list[Any] = [None] * self.n_slots
        self._active = np.zeros(self.n_slots, dtype=bool)
        self._done = np.ones(self.n_slots, dtype=bool)
        self._reward = np.zeros(self.n_slots)
        self._success = np.zeros(self.n_slots, dtype=bool)
        self._n_steps = np.zeros(self.n_slots, dtype=np.int64)

    def _stacked_obs(self):
        if isinstance(self._obs[0], dict):
            return {k: np.stack([o[k] for o in self._obs]) for k in self._obs[0]}
        return np.stack(self._obs)

    def _info(self) -> dict[str, np.ndarray]:
        return {
            "reward": self._reward.copy(),
            "done": self._done.copy(),
            "success": self._success.copy(),
            "n_steps": self._n_steps.copy(),
        }

    def _fail(self, exc: Exception) -> RuntimeError:
        return RuntimeError(
            f"episode worker {self.worker_index} failed: {type(exc).__name__}: {exc}\n"
            f"--- worker traceback ---\n{traceback.format_exc()}"
        )

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        try:
            episodes = (options or {}).get("episodes")
            if episodes is None:
                raise ValueError("EpisodeChunkEnv.reset needs options={'episodes': [...]}")
            mine = list(episodes)[self.worker_index * self.n_slots : (self.worker_index + 1) * self.n_slots]
            if len(mine) != self.n_slots:
                raise ValueError(
                    f"expected {self.n_slots} episodes for worker {self.worker_index}, got {len(mine)}"
                )
            for i, (env, ep) in enumerate(zip(self.envs, mine)):
                if ep is None:
                    # unused slot: a valid observation is needed for batching, it is never stepped
                    obs, _ = env.reset(seed=0, options={"video_path": None})
                else:
                    obs, _ = env.reset(seed=int(ep.seed), options={"video_path": ep.video_path})
                self._obs[i] = obs
                self._active[i] = ep is not None
            self._done = ~self._active
            self._reward[:] = 0.0
            self._success[:] = False
            self._n_steps[:] = 0
            return self._stacked_obs(), self._info()
        except Exception as exc:
            raise self._fail(exc) from exc

    def step(self, action):
        try:
            for i, env in enumerate(self.envs):
                if self._done[i]:
                    continue
                obs, reward, terminated, truncated, _ = env.step(action[i])
                self._obs[i] = obs
                self._reward[i] = reward
                self._n_steps[i] = len(env.get_wrapper_attr("reward"))
                if terminated or truncated:
                    self._done[i] = True
                    self._success[i] = bool(terminated)
                    env.get_wrapper_attr("stop_recording")()
            return self._stacked_obs(), 0.0, False, False, self._info()
        except Exception as exc:
            raise self._fail(exc) from exc

    def close(self):
        for env in self.envs:
            env.close()


class VectorRollout:
    """Runs a policy on a fixed number of episodes with ``n_envs`` workers.

    Args:
        episode_env_fn: picklable zero-argument factory of one episode env
            (``MultiStepWrapper(VideoRecordingWrapper(env))``).
        n_episodes: episodes per ``run`` (fixes the chunk size ``ceil(n_episodes / n_envs)``).
        n_envs: worker count; None -> :func:`default_n_envs`. 1 runs in-process.
        step_timeout_s: a worker silent for this long fails the run (nothing hangs).
    The vector env is created on the first ``run`` and kept for later runs; ``close()`` ends it.
    """

    def __init__(
        self,
        episode_env_fn: Callable[[], gym.Env],
        n_episodes: int,
        n_envs: int | None = None,
        step_timeout_s: float = 300.0,
        tqdm_interval_sec: float = 5.0,
    ):
        self._vec: gym.vector.VectorEnv | None = None
        if n_episodes < 1:
            raise ValueError(f"need at least one episode, got n_episodes={n_episodes}")
        if n_envs is None:
            n_envs = default_n_envs(n_episodes)
        if not isinstance(n_envs, int | np.integer) or n_envs < 1:
            raise ValueError(f"n_envs must be a positive int or None, got {n_envs!r}")
        self.episode_env_fn = episode_env_fn
        self.n_episodes = int(n_episodes)
        self.n_envs = int(min(n_envs, n_episodes))
        self.n_slots = math.ceil(self.n_episodes / self.n_envs)
        self.step_timeout_s = float(step_timeout_s)
        self.tqdm_interval_sec = float(tqdm_interval_sec)

    # -------------------------------------------------------------- vector env lifecycle
    def _env_fns(self) -> list[Callable[[], gym.Env]]:
        return [_ChunkFactory(self.episode_env_fn, self.n_slots, worker_index=i) for i in range(self.n_envs)]

    def _ensure_vec(self) -> gym.vector.VectorEnv:
        if self._vec is None:
            if self.n_envs == 1:
                self._vec = SyncVectorEnv(self._env_fns(), autoreset_mode=AutoresetMode.DISABLED)
            else:
                self._vec = AsyncVectorEnv(
                    self._env_fns(), context=MP_CONTEXT, autoreset_mode=AutoresetMode.DISABLED, daemon=True
                )
        return self._vec

    def start(self) -> None:
        """Start the worker processes now instead of at the first ``run`` (e.g. to time runs alone)."""
        self._ensure_vec()

    def close(self, terminate: bool = False) -> None:
        vec, self._vec = self._vec, None
        if vec is None:
            return
        try:
            if isinstance(vec, AsyncVectorEnv):
                vec.close(terminate=terminate)
            else:
                vec.close()
        except Exception:
            # a broken worker must not mask the error that made us close
            pass

    def __del__(self):
        if hasattr(self, "_vec"):
            self.close(terminate=True)

    def _dead_worker(self, grace_s: float = 2.0) -> str | None:
        """Which worker process died (killed or crashed), if one did; None when all live or exited cleanly.

        A worker that raised an exception sends it back and exits with code 0: that is a failure with a
        traceback, not a death. The exit status of a killed worker reaches us a moment after its pipe
        closed, hence the short wait.
        """
        vec = self._vec
        if not isinstance(vec, AsyncVectorEnv):
            return None
        deadline = time.monotonic() + grace_s
        while True:
            for i, process in enumerate(vec.processes):
                code = process.exitcode
                if code is not None and code < 0:
                    name = signal.Signals(-code).name
                    hint = " (often: out of memory)" if -code == signal.SIGKILL else ""
                    return f"env worker {i} (pid {process.pid}) was killed by {name}{hint}"
                if code is not None and code > 0:
                    return f"env worker {i} (pid {process.pid}) exited with code {code}"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            multiprocessing.connection.wait([p.sentinel for p in vec.processes], timeout=min(remaining, 0.1))
            time.sleep(0.01)

    def _reset(self, episodes: list[Episode | None]):
        vec = self._ensure_vec()
        options = {"episodes": episodes}
        if isinstance(vec, AsyncVectorEnv):
            vec.reset_async(options=options)
            return vec.reset_wait(timeout=self.step_timeout_s)
        return vec.reset(options=options)

    def _step(self, actions: np.ndarray):
        vec = self._vec
        if isinstance(vec, AsyncVectorEnv):
            vec.step_async(actions)
            return vec.step_wait(timeout=self.step_timeout_s)
        return vec.step(actions)

    # -------------------------------------------------------------- rollout
    def run(
        self,
        policy: Any,
        episodes: Sequence[Episode],
        obs_to_policy: Callable[[Any], dict[str, np.ndarray]],
        action_from_policy: Callable[[np.ndarray], np.ndarray] = lambda a: a,
        past_action: bool = False,
        n_obs_steps: int = 1,
        desc: str = "rollout",
        execution: ExecutionSpec | None = None,
    ) -> RolloutResult:
        """Roll ``policy`` out on ``episodes`` (all at once) until every episode has ended.

        ``obs_to_policy`` maps the active episodes' stacked observations (B, ...) to the numpy
        inputs of ``policy.predict_action``; ``action_from_policy`` maps its (B, k, Da) action
        output to the chunk that is executed. With ``execution`` the executed actions come instead from
        the policy's chunk (``action_pred`` from ``policy.chunk_start`` on) under that execution mode and
        inference delay (:mod:`diffusion_policy.common.chunk_execution`).
        """
        episodes = list(episodes)
        if len(episodes) != self.n_episodes:
            raise ValueError(f"this rollout was built for {self.n_episodes} episodes, got {len(episodes)}")
        n_total = self.n_envs * self.n_slots
        slots: list[Episode | None] = episodes + [None] * (n_total - len(episodes))
        try:
            result = self._run(
                policy, slots, obs_to_policy, action_from_policy, past_action, n_obs_steps, desc, execution
            )
        except Exception as exc:
            dead = self._dead_worker()
            self.close(terminate=True)
            if dead is not None:
                raise WorkerDiedError(f"{dead} during a rollout ({type(exc).__name__}: {exc})") from exc
            raise RuntimeError(f"PushT rollout failed: {type(exc).__name__}: {exc}") from exc
        except BaseException:
            # a stop signal (or KeyboardInterrupt): workers may be mid-step, so end them rather than wait
            self.close(terminate=True)
            raise
        n = len(episodes)
        return RolloutResult(
            max_reward=result[0][:n],
            success=result[1][:n],
            n_steps=result[2][:n],
            video_paths=[ep.video_path for ep in episodes],
        )

    def _run(
        self, policy, slots, obs_to_policy, action_from_policy, past_action, n_obs_steps, desc, execution
    ):
        n_total = len(slots)
        executor = None if execution is None else ChunkExecutor(execution, n_total)
        obs, info = self._reset(slots)
        obs = _flatten_workers(obs, n_total)
        done = np.array([ep is None for ep in slots])
        reward = np.zeros(n_total)
        success = np.zeros(n_total, dtype=bool)
        n_steps = np.zeros(n_total, dtype=np.int64)
        last_action: np.ndarray | None = None
        # imported here so that env workers, which unpickle this module, never load torch
        import torch

        policy.reset()
        device = policy.device
        pbar = tqdm.tqdm(desc=desc, leave=False, mininterval=self.tqdm_interval_sec, unit="call")
        try:
            while not done.all():
                shutdown.raise_if_requested()
                idx = np.flatnonzero(~done)
                np_obs = obs_to_policy(_slot_index(obs, idx))
                if past_action and last_action is not None and n_obs_steps > 1:
                    np_obs["past_action"] = last_action[idx, -(n_obs_steps - 1) :].astype(np.float32)
                guide = None if executor is None else executor.guide(idx)
                with torch.no_grad():
                    t_obs = {
                        k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in np_obs.items()
                    }
                    # the guide goes only to a policy that is asked for it (rtc), so any policy runs the rest
                    extra = {} if guide is None else {"guide": (torch.from_numpy(guide[0]), guide[1])}
                    out = policy.predict_action(t_obs, **extra)
                if not isinstance(out, dict) or "action" not in out:
                    raise TypeError("policy.predict_action must return a dict with an 'action' tensor")
                if executor is None:
                    action = action_from_policy(out["action"].detach().to("cpu").numpy())
                else:
                    chunk = out["action_pred"][:, policy.chunk_start :].detach().to("cpu").numpy()
                    action = executor.execute(chunk, idx)
                if action.ndim != 3 or action.shape[0] != len(idx) or action.shape[1] < 1:
                    raise ValueError(
                        f"policy returned actions of shape {tuple(out['action'].shape)}; expected "
                        f"(B={len(idx)}, n_action_steps, action_dim)"
                    )
                full = np.zeros((n_total, *action.shape[1:]), dtype=np.float64)
                full[idx] = action
                last_action = (
                    full if last_action is None else np.where(done[:, None, None], last_action, full)
                )
                obs, _, _, _, info = self._step(full.reshape(self.n_envs, self.n_slots, *action.shape[1:]))
                obs = _flatten_workers(obs, n_total)
                reward = info["reward"].reshape(n_total)
                success = info["success"].reshape(n_total)
                n_steps = info["n_steps"].reshape(n_total)
                done |= info["done"].reshape(n_total)
                pbar.update(1)
        finally:
            pbar.close()
        return reward.astype(np.float64), success.astype(bool), n_steps


class _ChunkFactory:
    """Picklable factory of one worker's :class:`EpisodeChunkEnv`."""

    def __init__(self, episode_env_fn: Callable[[], gym.Env], n_slots: int, worker_index: int):
        self.episode_env_fn = episode_env_fn
        self.n_slots = n_slots
        self.worker_index = worker_index
        # gymnasium also calls a factory in the parent (to read the spaces): only a worker process may
        # change its signal handling
        self.parent_pid = os.getpid()

    def __call__(self) -> EpisodeChunkEnv:
        if os.getpid() != self.parent_pid:
            shutdown.ignore_interrupts_in_worker()
        return EpisodeChunkEnv(self.episode_env_fn, self.n_slots, self.worker_index)


def episode_log(result: RolloutResult, episodes: Sequence[Episode]) -> dict[str, Any]:
    """The runners' flat log dict: per-seed max reward / video path, per-prefix mean score and success."""
    log: dict[str, Any] = {}
    by_prefix: dict[str, list[int]] = {}
    for i, ep in enumerate(episodes):
        by_prefix.setdefault(ep.prefix, []).append(i)
        log[f"{ep.prefix}sim_max_reward_{ep.seed}"] = float(result.max_reward[i])
        if result.video_paths[i] is not None:
            log[f"{ep.prefix}sim_video_{ep.seed}"] = result.video_paths[i]
    for prefix, idx in by_prefix.items():
        log[f"{prefix}mean_score"] = float(np.mean(result.max_reward[idx]))
        log[f"{prefix}success_rate"] = float(np.mean(result.success[idx]))
    return log


@dataclass(frozen=True)
class EpisodePlan:
    """The seeded episodes a runner rolls out: ``n_train`` from ``train_start_seed``, then ``n_test`` from
    ``test_start_seed``; the first ``n_*_vis`` of each record ``media/{split}_{seed}_run{k}.mp4``."""

    output_dir: str
    n_train: int
    n_train_vis: int
    train_start_seed: int
    n_test: int
    n_test_vis: int
    test_start_seed: int

    @property
    def n_episodes(self) -> int:
        return self.n_train + self.n_test

    def episodes(self, run_index: int) -> list[Episode]:
        """Train then test episodes of run ``run_index`` (its number in the video file names)."""
        media = os.path.join(self.output_dir, "media")
        episodes = []
        for split, n, n_vis, start in (
            ("train", self.n_train, self.n_train_vis, self.train_start_seed),
            ("test", self.n_test, self.n_test_vis, self.test_start_seed),
        ):
            for i in range(n):
                seed = start + i
                path = os.path.join(media, f"{split}_{seed}_run{run_index:04d}.mp4") if i < n_vis else None
                episodes.append(Episode(seed=seed, prefix=f"{split}/", video_path=path))
        return episodes


def next_free_run_index(episodes_fn: Callable[[int], list[Episode]], start: int) -> int:
    """Smallest run index >= start whose video files do not exist yet (never overwrite old videos)."""
    k = start
    while any(ep.video_path is not None and os.path.exists(ep.video_path) for ep in episodes_fn(k)):
        k += 1
    return k


class SeededEpisodeRunner:
    """What the PushT runners share: their seeded episode plan, the worker pool and ``run``/``close``.

    A runner calls ``_init_rollout`` from its constructor and defines ``_obs_to_policy`` (and, if the
    policy's action chunk needs trimming, ``_action_from_policy``); it also sets ``n_obs_steps`` and
    ``past_action``.
    """

    n_obs_steps: int
    n_action_steps: int
    past_action: bool

    def _init_rollout(
        self,
        plan: EpisodePlan,
        episode_env_fn: Callable[[], gym.Env],
        n_envs: int | None,
        step_timeout_s: float,
        tqdm_interval_sec: float,
    ) -> None:
        self._plan = plan.episodes
        self._run_index = 0
        self.rollout = VectorRollout(
            episode_env_fn,
            plan.n_episodes,
            n_envs=n_envs,
            step_timeout_s=step_timeout_s,
            tqdm_interval_sec=tqdm_interval_sec,
        )
        self.n_envs = self.rollout.n_envs

    def _obs_to_policy(self, obs: Any) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _action_from_policy(self, action: np.ndarray) -> np.ndarray:
        return action

    def run(self, policy: Any, execution: ExecutionSpec | None = None) -> dict[str, Any]:
        """Roll ``policy`` out on every planned episode; returns the flat metric/video-path dict.

        ``execution``: how chunks are executed under an inference delay (None: the original's protocol,
        the world waits for every chunk).
        """
        if execution is not None:
            self.check_execution(execution)
        # videos of earlier runs (also of an earlier process) are never overwritten
        self._run_index = next_free_run_index(self._plan, self._run_index)
        episodes = self._plan(self._run_index)
        self._run_index += 1
        result = self.rollout.run(
            policy,
            episodes,
            obs_to_policy=self._obs_to_policy,
            action_from_policy=self._action_from_policy,
            past_action=self.past_action,
            n_obs_steps=self.n_obs_steps,
            desc=f"Eval {type(self).__name__} ({len(episodes)} episodes)",
            execution=execution,
        )
        return episode_log(result, episodes)

    def check_execution(self, execution: ExecutionSpec) -> None:
        """An execution spec fits this runner: it executes the runner's n_action_steps per chunk, and the
        original's ``n_latency_steps`` (a different model of latency) is not combined with it."""
        if execution.n_action_steps != self.n_action_steps:
            raise ValueError(
                f"execution spec executes {execution.n_action_steps} actions per chunk; this runner steps "
                f"n_action_steps={self.n_action_steps}"
            )
        if getattr(self, "n_latency_steps", 0):
            raise ValueError(
                f"n_latency_steps={self.n_latency_steps} (the original's observation latency) cannot be "
                "combined with an inference delay; set task.env_runner.n_latency_steps=0"
            )

    def start(self) -> None:
        """Start the worker processes now (otherwise the first ``run`` starts them)."""
        self.rollout.start()

    def close(self) -> None:
        """Stop the worker processes (they are otherwise kept for the next run)."""
        self.rollout.close()
