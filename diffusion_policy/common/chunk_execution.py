"""How action chunks become executed actions when inference takes time: the four execution modes.

Time is counted in control steps. A chunk is computed from the observation at step t and predicts the
actions of steps t, t+1, ..., t+H-1 (H = ``chunk_length``: the policy's predicted actions from the current
step on, ``horizon - action_start``). A new chunk is requested every s = ``n_action_steps`` steps. With an
inference delay of d steps it exists only from step t+d on, so steps t .. t+d-1 still run on earlier chunks:

- ``sync``: the world waits for inference (d must be 0): chunk indices 0 .. s-1 run. Today's protocol and
  the original's.
- ``async``: steps t .. t+d-1 run the previous chunk's indices s .. s+d-1, then the new chunk from its
  index d ("naive switching").
- ``ensemble``: temporal ensembling (Zhao et al. 2023, ACT): every step runs the weighted mean of all
  available chunks' predictions for it, a chunk of rank i (0 = the oldest) weighted ``exp(-decay * i)``;
  a chunk predicts its indices 0 .. s+overlap-1.
- ``rtc``: real-time chunking (Black, Galliker, Levine 2025): the new chunk is sampled with its first d
  actions frozen to the previous chunk's (they run before it exists) and the rest of the ``overlap``
  softly guided toward the previous chunk with exponentially decaying weights (:func:`rtc_weights`);
  then it switches like ``async``.

``overlap`` is how many steps of the previous chunk past its own s steps are still used: at least d (those
steps run on it), at most H - s (what it predicts). Its default is d for ``async`` and H - s (all it
predicts) for ``ensemble`` and ``rtc``, as in the papers; with d = 0 and overlap = 0 every mode is ``sync``.
The first chunk of an episode starts at its index 0: before it exists the robot has not started moving.

Only numpy here: the simulated rollouts, the real-time controller and the torch-free runtime share it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MODES = ("sync", "async", "ensemble", "rtc")
# how rtc steers the new chunk (diffusion_policy.policy.chunk_guidance; named here, where no torch is needed)
GUIDANCE_METHODS = ("guidance", "inpaint")
# ACT's temporal-ensembling constant (its w_i = exp(-m * i), m = 0.01)
ENSEMBLE_DECAY = 0.01


@dataclass(frozen=True)
class ExecutionSpec:
    """Mode, delay d and overlap of chunked execution for a policy that executes s = ``n_action_steps`` of
    the ``chunk_length`` = H actions it predicts from the current step on.

    Construction checks every combination and raises ``ValueError`` with one line naming the bad value.
    """

    mode: str
    delay: int
    n_action_steps: int
    chunk_length: int
    overlap: int | None = None
    ensemble_decay: float = ENSEMBLE_DECAY

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"execution mode {self.mode!r} is not one of {list(MODES)}")
        d, s, h = self.delay, self.n_action_steps, self.chunk_length
        if isinstance(d, bool) or not isinstance(d, int | np.integer) or d < 0:
            raise ValueError(f"delay={d!r} must be an integer >= 0 (control steps)")
        if self.mode == "sync" and d > 0:
            raise ValueError(
                f"delay={d} with execution 'sync': sync means the world waits for inference (delay 0); "
                "use --execution async, ensemble or rtc to execute while the next chunk is computed"
            )
        if d >= s:
            raise ValueError(
                f"delay={d} is at or past the executed horizon n_action_steps={s}: every chunk would be "
                f"replaced before any of its actions ran; use a delay below {s}"
            )
        max_overlap = h - s
        if self.overlap is not None:
            o = self.overlap
            if (
                isinstance(o, bool)
                or not isinstance(o, int | np.integer)
                or not d <= o <= max(max_overlap, d)
            ):
                raise ValueError(
                    f"overlap={o!r} must be an integer from the delay ({d}) to chunk_length - n_action_steps "
                    f"({max_overlap})"
                )
        if self.resolved_overlap > max_overlap:
            raise ValueError(
                f"delay={d} needs {d} predicted actions past the executed {s}, but this policy predicts "
                f"{h} from the current step ({max_overlap} past them; horizon too short or "
                "pred_action_steps_only): lower the delay or train with a longer horizon"
            )
        if self.mode == "sync" and self.resolved_overlap > 0:
            raise ValueError(f"overlap={self.overlap} means nothing for execution 'sync'; leave it out")
        if not self.ensemble_decay >= 0:
            raise ValueError(f"ensemble_decay={self.ensemble_decay} must be >= 0")

    @property
    def resolved_overlap(self) -> int:
        if self.overlap is not None:
            return int(self.overlap)
        if self.mode in ("ensemble", "rtc"):
            return max(self.chunk_length - self.n_action_steps, int(self.delay))
        return int(self.delay)

    @property
    def is_sync_equivalent(self) -> bool:
        """True when every mode reduces to today's protocol (no delay, no overlap)."""
        return self.delay == 0 and self.resolved_overlap == 0

    def label(self) -> str:
        return f"{self.mode}(delay={self.delay}, overlap={self.resolved_overlap})"


def rtc_weights(delay: int, overlap: int, length: int) -> np.ndarray:
    """RTC's guidance weights over the new chunk's indices 0 .. length-1 (float64, (length,)).

    1 for the ``delay`` frozen actions, then ``c * (exp(c) - 1) / (e - 1)`` with
    ``c = (overlap - i) / (overlap - delay + 1)`` over the rest of the overlap (decaying from nearly 1 toward
    0), 0 past the overlap, where the new chunk is free.
    """
    weights = np.zeros(length, dtype=np.float64)
    weights[: min(delay, length)] = 1.0
    for i in range(delay, min(overlap, length)):
        c = (overlap - i) / (overlap - delay + 1)
        weights[i] = c * math.expm1(c) / (math.e - 1)
    return weights


class ChunkTimeline:
    """One episode's chunks on the control-step clock: which action runs at each step.

    A chunk is added with the step it was computed for (``start``: its index 0 is that step's action) and
    the first step it can act on (``available``). At a step, ``sync``/``async``/``rtc`` run the newest
    available chunk (an older one keeps running until the next exists), ``ensemble`` the weighted mean of
    all available chunks that predict the step within their first ``s + overlap`` indices. The simulated
    rollouts (:class:`ChunkExecutor`) and the real-time controller
    (:class:`diffusion_policy.deploy.controller.RealTimeController`) share it.
    """

    def __init__(self, spec: ExecutionSpec) -> None:
        self.spec = spec
        self.chunks: list[tuple[int, int, np.ndarray]] = []  # (start, available, (H, Da))

    def add(self, chunk: np.ndarray, start: int, available: int) -> None:
        self.chunks.append((int(start), int(available), np.asarray(chunk, dtype=np.float64)))

    def _window(self) -> int:
        """How many of a chunk's indices may act: its first s + overlap for ensembling, else all."""
        spec = self.spec
        return spec.n_action_steps + spec.resolved_overlap if spec.mode == "ensemble" else spec.chunk_length

    def action_at(self, step: int) -> np.ndarray | None:
        """The action for ``step``, (Da,) float64; None when no available chunk predicts it."""
        window = self._window()
        usable = [(s, c) for s, a, c in self.chunks if a <= step and 0 <= step - s < min(window, len(c))]
        if not usable:
            return None
        if self.spec.mode != "ensemble":
            start, chunk = usable[-1]
            return chunk[step - start]
        weights = np.exp(-self.spec.ensemble_decay * np.arange(len(usable)))
        predictions = np.stack([c[step - s] for s, c in usable])
        return np.tensordot(weights / weights.sum(), predictions, axes=1)

    def guide(self, step: int, delay: int) -> tuple[np.ndarray, np.ndarray] | None:
        """RTC's guide for a chunk computed for ``step`` that will exist ``delay`` steps later: (target
        (H, Da): the newest chunk's actions for steps ``step`` on, over the overlap; weights (H,)), or None
        (no chunk yet, or an empty overlap)."""
        spec = self.spec
        overlap = spec.resolved_overlap
        if not self.chunks or overlap == 0:
            return None
        start, _, previous = self.chunks[-1]
        h = spec.chunk_length
        target = np.zeros((h, previous.shape[-1]), dtype=np.float64)
        offset = step - start
        n = max(0, min(overlap, len(previous) - offset))
        target[:n] = previous[offset : offset + n]
        delay = min(int(delay), n)  # what the previous chunk cannot cover is not frozen
        return target, rtc_weights(delay, n, h)

    def prune(self, step: int) -> None:
        """Forget chunks that cannot act at ``step`` or later."""
        window = self._window()
        newest_available = max((a for _, a, _ in self.chunks if a <= step), default=None)
        self.chunks = [
            (s, a, c)
            for s, a, c in self.chunks
            if step - s < min(window, len(c))
            and (self.spec.mode == "ensemble" or newest_available is None or a >= newest_available)
        ]


class ChunkExecutor:
    """The executed actions of a batch of simulated episodes under an :class:`ExecutionSpec`, one cycle of s
    control steps at a time, with a fixed delay of d steps (an episode's first chunk acts at once).

    Per cycle the caller asks :meth:`guide` for the RTC target of the chunks it is about to compute (None
    outside ``rtc`` and before the first chunk), computes the new chunks (B, H, Da) of the rows ``rows``
    (indices into the batch of ``batch_size`` episodes) and passes them to :meth:`execute`, which returns
    the (len(rows), s, Da) actions the episodes run during the cycle.
    """

    def __init__(self, spec: ExecutionSpec, batch_size: int) -> None:
        self.spec = spec
        self.batch_size = int(batch_size)
        self.reset()

    def reset(self) -> None:
        self._timelines = [ChunkTimeline(self.spec) for _ in range(self.batch_size)]
        self._cycle = np.zeros(self.batch_size, dtype=np.int64)

    def guide(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """For ``rtc``: (target (len(rows), H, Da), weights (H,)) the new chunks should follow: the previous
        chunk's actions for the same steps (its indices s, s+1, ...), zero past the overlap. None when no
        guide applies (another mode, an empty overlap, or the first chunk of these episodes)."""
        if self.spec.mode != "rtc":
            return None
        s = self.spec.n_action_steps
        guides = [self._timelines[r].guide(int(self._cycle[r]) * s, self.spec.delay) for r in rows.tolist()]
        if any(g is None for g in guides):
            if not all(g is None for g in guides):
                raise ValueError("rtc: the episodes of one batch must start together")
            return None
        return np.stack([g[0] for g in guides]), guides[0][1]

    def execute(self, new_chunks: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """new_chunks (len(rows), H, Da), computed from this cycle's observations -> (len(rows), s, Da)."""
        spec = self.spec
        s = spec.n_action_steps
        if (
            new_chunks.ndim != 3
            or new_chunks.shape[1] != spec.chunk_length
            or new_chunks.shape[0] != len(rows)
        ):
            raise ValueError(
                f"chunks of shape {tuple(new_chunks.shape)}; expected ({len(rows)}, {spec.chunk_length}, "
                "action_dim)"
            )
        out = np.empty((len(rows), s, new_chunks.shape[-1]), dtype=np.float64)
        for j, row in enumerate(np.asarray(rows).tolist()):
            timeline = self._timelines[row]
            start = int(self._cycle[row]) * s
            first = not timeline.chunks
            timeline.add(new_chunks[j], start, start if first else start + spec.delay)
            for k in range(s):
                out[j, k] = timeline.action_at(start + k)
            timeline.prune(start + s)
            self._cycle[row] += 1
        return out
