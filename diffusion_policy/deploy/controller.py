"""Run a policy on a robot in real time: inference in a background thread, one action per control tick.

    from diffusion_policy.deploy.controller import RealTimeController

    controller = RealTimeController(policy, control_hz=10, execution="rtc")  # a torch or exported policy
    with controller:                     # starts the inference thread; stops it on exit
        while running:
            action = controller.step(obs)  # this tick's observation -> this tick's action (Da,)
            robot.apply(action)
            wait_for_next_tick()

Every ``n_action_steps`` ticks the controller hands the latest ``n_obs_steps`` observations to the inference
thread and keeps executing the current chunk meanwhile; a new chunk takes over (or is ensembled in) from the
first tick after it arrives, at the index of that tick, exactly as ``eval.py --delay D --execution MODE``
simulates it (both use :class:`diffusion_policy.common.chunk_execution.ChunkTimeline`). The controller times
every inference with its ``clock``, keeps the recent latencies and derives the delay in ticks,
``ceil(latency * control_hz)``, that RTC freezes. The first call of an episode waits for its first chunk
(the robot has not started moving). Pass ``clock`` to drive it from a simulated clock.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from diffusion_policy.common.chunk_execution import ChunkTimeline, ExecutionSpec
from diffusion_policy.common.online_queues import OnlineQueues, check_step_keys


def _is_torch_policy(policy: Any) -> bool:
    return any(cls.__module__.startswith("torch") for cls in type(policy).__mro__)


class RealTimeController:
    """Chunked execution of ``policy`` at ``control_hz`` with inference running beside the control loop.

    Args:
        policy: a torch diffusion policy or an exported policy (:mod:`diffusion_policy.deploy.runtime`).
        control_hz: control ticks per second (PushT: 10).
        execution: ``async``, ``ensemble`` or ``rtc`` (``sync`` would stop the robot during inference).
        overlap: as in :class:`ExecutionSpec` (default: the mode's).
        clock: seconds as a float (default ``time.monotonic``).
        latency_window: the derived delay uses the largest of this many recent latencies.
        max_delay: the largest delay in ticks RTC may freeze (default: n_action_steps - 1).
    """

    def __init__(
        self,
        policy: Any,
        control_hz: float,
        execution: str = "rtc",
        overlap: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        latency_window: int = 5,
        max_delay: int | None = None,
    ) -> None:
        if not float(control_hz) > 0:
            raise ValueError(f"control_hz={control_hz!r} must be > 0")
        if execution == "sync":
            raise ValueError("execution 'sync' stops the robot during inference; use async, ensemble or rtc")
        self.policy = policy
        self.control_hz = float(control_hz)
        self.clock = clock
        self.torch = _is_torch_policy(policy)
        if execution == "rtc" and not self.torch:
            raise ValueError(
                "execution 'rtc' needs a torch policy (its guidance differentiates the denoiser)"
            )
        s, h = int(policy.n_action_steps), int(policy.chunk_length)
        self.max_delay = s - 1 if max_delay is None else int(max_delay)
        # the delay varies with the measured latency, so the spec holds the mode and overlap only
        self.spec = ExecutionSpec(execution, 0, s, h, overlap)
        self.n_action_steps, self.chunk_length = s, h
        self.obs_shapes = dict(policy.obs_shapes)
        self.latencies: deque[float] = deque(maxlen=int(latency_window))
        self._queues = OnlineQueues(int(policy.n_obs_steps), np.stack)
        self._lock = threading.Condition()
        self._request: tuple[int, dict[str, np.ndarray], Any] | None = None
        self._result: tuple[int, np.ndarray, float] | None = None
        self._busy = False
        self._error: BaseException | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.reset()

    # ---------------- lifecycle ----------------
    def start(self) -> RealTimeController:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._worker, name="policy-inference", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Ask the inference thread to end after its current chunk and wait for it."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> RealTimeController:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def reset(self) -> None:
        """A new episode: forget observations and chunks (a chunk still being computed is discarded)."""
        with self._lock:
            self._queues.reset()
            self.timeline = ChunkTimeline(self.spec)
            self.tick = 0
            self._next_request = 0
            self._episode = getattr(self, "_episode", 0) + 1
            self._request = None
            self._result = None
            self.underruns = 0
            self._last_action: np.ndarray | None = None

    # ---------------- latency ----------------
    @property
    def latency_s(self) -> float | None:
        """The largest of the recent inference latencies, in seconds (None before the first)."""
        return max(self.latencies) if self.latencies else None

    @property
    def delay_steps(self) -> int:
        """The inference delay in control ticks that the measured latency implies: ceil(latency * hz)."""
        if self.latency_s is None:
            return 0
        return min(self.max_delay, math.ceil(self.latency_s * self.control_hz - 1e-9))

    # ---------------- the control loop's side ----------------
    def step(self, obs: Mapping[str, Any] | np.ndarray) -> np.ndarray:
        """This tick's observation ({key: (*shape)}, or the bare array of a state policy) -> action (Da,)."""
        if not isinstance(obs, Mapping):
            obs = {"obs": obs}
        check_step_keys(obs, self.obs_shapes)
        self._raise_worker_error()
        if self._thread is None:
            raise RuntimeError("RealTimeController.step before start(); use `with controller:` or start()")
        self._queues.add_observation({k: np.asarray(obs[k], dtype=np.float32)[None] for k in self.obs_shapes})
        self._collect()
        if self.tick == self._next_request:
            self._submit()
            self._next_request += self.n_action_steps
        if self._last_action is None and not self.timeline.chunks:
            # the first chunk of an episode: nothing moves until it exists
            self.wait_idle()
            self._raise_worker_error()
            self._collect(first=True)
        action = self.timeline.action_at(self.tick)
        if action is None:
            # the last chunk ran out before the next one arrived: hold the last action
            self.underruns += 1
            action = self._last_action
        self._last_action = action
        self.timeline.prune(self.tick + 1)
        self.tick += 1
        return action

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no inference is queued or running (True), or ``timeout`` seconds pass (False)."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._busy or self._error is not None, timeout)

    def _submit(self) -> None:
        window = self._queues.stacked_observations()
        guide = None
        if self.spec.mode == "rtc":
            guide = self.timeline.guide(self.tick, self.delay_steps)
        with self._lock:
            self._request = (self.tick, window, guide)
            self._busy = True
            self._lock.notify_all()

    def _collect(self, first: bool = False) -> None:
        with self._lock:
            result, self._result = self._result, None
        if result is None:
            return
        start, chunk, latency = result
        self.latencies.append(latency)
        # a chunk acts from the first tick after it arrived (this one); the first of an episode at once
        self.timeline.add(chunk, start, start if first else self.tick)

    def _raise_worker_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"policy inference failed: {type(error).__name__}: {error}") from error

    # ---------------- the inference thread ----------------
    def _worker(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._request is not None or self._stopping)
                if self._stopping:
                    self._busy = False
                    self._lock.notify_all()
                    return
                request, self._request, episode = self._request, None, self._episode
            start_tick, window, guide = request
            try:
                began = self.clock()
                chunk = self._infer(window, guide)
                latency = self.clock() - began
            except BaseException as e:  # handed to the control loop, which raises it
                with self._lock:
                    self._error = e
                    self._busy = False
                    self._lock.notify_all()
                continue
            with self._lock:
                if episode == self._episode:
                    self._result = (start_tick, chunk, latency)
                self._busy = self._request is not None
                self._lock.notify_all()

    def _infer(
        self, window: dict[str, np.ndarray], guide: tuple[np.ndarray, np.ndarray] | None
    ) -> np.ndarray:
        """Observations {key: (1, To, *shape)} -> the chunk (H, Da) from the current step on."""
        policy = self.policy
        if not self.torch:
            out = policy.predict_action(window)
            return np.asarray(out["action_pred"][0, policy.chunk_start :], dtype=np.float64)
        import torch

        with torch.no_grad():
            obs = {k: torch.as_tensor(v, device=policy.device, dtype=policy.dtype) for k, v in window.items()}
            extra = {} if guide is None else {"guide": (torch.as_tensor(guide[0])[None], guide[1])}
            out = policy.predict_action(obs, **extra)
        return out["action_pred"][0, policy.chunk_start :].detach().to("cpu", torch.float64).numpy()
