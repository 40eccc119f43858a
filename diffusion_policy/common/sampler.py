"""Fixed-length windows over the episodes of a ReplayBuffer, and the train/val episode split.

A window of ``sequence_length`` steps may start up to ``pad_before`` steps before its episode and
end up to ``pad_after`` steps after it; the missing steps repeat the episode's first or last frame.
So each episode of length L yields ``L - sequence_length + pad_before + pad_after + 1`` windows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from diffusion_policy.common.replay_buffer import ReplayBuffer


def create_indices(
    episode_ends: np.ndarray,
    sequence_length: int,
    episode_mask: np.ndarray,
    pad_before: int = 0,
    pad_after: int = 0,
    debug: bool = True,
) -> np.ndarray:
    """Rows ``[buffer_start, buffer_end, sample_start, sample_end]`` (int64, (N, 4)), one per window.

    ``buffer_start:buffer_end`` is the real data the window covers; it lands at
    ``sample_start:sample_end`` inside the window, the rest is edge padding. Episodes whose
    ``episode_mask`` entry is False yield no windows. Pads are clamped to [0, sequence_length - 1].
    """
    episode_ends = np.asarray(episode_ends, dtype=np.int64)
    episode_mask = np.asarray(episode_mask, dtype=bool)
    if episode_mask.shape != episode_ends.shape:
        raise ValueError(
            f"episode_mask has shape {episode_mask.shape}, expected {episode_ends.shape} (one per episode)"
        )
    if sequence_length < 1:
        raise ValueError(f"sequence_length={sequence_length} must be >= 1")
    pad_before = min(max(pad_before, 0), sequence_length - 1)
    pad_after = min(max(pad_after, 0), sequence_length - 1)

    starts = np.concatenate([[0], episode_ends[:-1]]).astype(np.int64)
    lengths = episode_ends - starts
    counts = np.where(episode_mask, np.maximum(lengths - sequence_length + pad_before + pad_after + 1, 0), 0)
    total = int(counts.sum())
    if total == 0:
        return np.zeros((0, 4), dtype=np.int64)
    episode = np.repeat(np.arange(len(episode_ends)), counts)
    first_row = np.cumsum(counts) - counts
    # idx: window start relative to its episode's first step, from -pad_before upwards.
    idx = np.arange(total) - first_row[episode] - pad_before
    s = starts[episode]
    length = lengths[episode]
    buffer_start = np.maximum(idx, 0) + s
    buffer_end = np.minimum(idx + sequence_length, length) + s
    sample_start = buffer_start - (idx + s)
    sample_end = sequence_length - ((idx + sequence_length + s) - buffer_end)
    if debug:
        assert np.all(sample_start >= 0) and np.all(sample_end <= sequence_length)
        assert np.all(sample_end - sample_start == buffer_end - buffer_start)
    return np.stack([buffer_start, buffer_end, sample_start, sample_end], axis=1)


def get_val_mask(n_episodes: int, val_ratio: float, seed: int = 0) -> np.ndarray:
    """(n_episodes,) bool, True for validation episodes: ``round(n * val_ratio)`` of them, at least
    one and leaving at least one for training, drawn with ``np.random.default_rng(seed)``."""
    val_mask = np.zeros(n_episodes, dtype=bool)
    if val_ratio <= 0:
        return val_mask
    n_val = min(max(1, round(n_episodes * val_ratio)), n_episodes - 1)
    rng = np.random.default_rng(seed=seed)
    val_mask[rng.choice(n_episodes, size=n_val, replace=False)] = True
    return val_mask


def downsample_mask(mask: np.ndarray, max_n: int | None, seed: int = 0) -> np.ndarray:
    """Keep a random ``max_n`` of the True entries of ``mask`` (all of them if there are fewer)."""
    mask = np.asarray(mask, dtype=bool)
    if max_n is None or mask.sum() <= max_n:
        return mask
    true_idxs = np.nonzero(mask)[0]
    rng = np.random.default_rng(seed=seed)
    keep = true_idxs[rng.choice(len(true_idxs), size=int(max_n), replace=False)]
    out = np.zeros_like(mask)
    out[keep] = True
    return out


class SequenceSampler:
    """Cuts windows of ``sequence_length`` steps out of a ReplayBuffer.

    ``key_first_k={key: k}`` materialises only the first k steps of that key's window (e.g. the
    observation frames a policy encodes): ``sample_sequence`` then returns k steps for it instead
    of ``sequence_length``. (The original returned full-length arrays with NaN after step k.)
    """

    def __init__(
        self,
        replay_buffer: ReplayBuffer,
        sequence_length: int,
        pad_before: int = 0,
        pad_after: int = 0,
        keys: Sequence[str] | None = None,
        key_first_k: dict[str, int] | None = None,
        episode_mask: np.ndarray | None = None,
    ) -> None:
        keys = list(replay_buffer.keys()) if keys is None else list(keys)
        missing = [k for k in keys if k not in replay_buffer]
        if missing:
            raise KeyError(f"keys {missing} not in the replay buffer; it has {sorted(replay_buffer.keys())}")
        key_first_k = dict(key_first_k or {})
        bad = {k: v for k, v in key_first_k.items() if k not in keys or int(v) < 1}
        if bad:
            raise ValueError(f"key_first_k {bad} must name sampled keys {keys} with k >= 1")
        episode_ends = replay_buffer.episode_ends
        if episode_mask is None:
            episode_mask = np.ones(episode_ends.shape, dtype=bool)
        self.indices = create_indices(
            episode_ends, sequence_length, episode_mask, pad_before=pad_before, pad_after=pad_after
        )
        self.replay_buffer = replay_buffer
        self.sequence_length = sequence_length
        self.keys = keys
        self.key_first_k = {k: min(int(v), sequence_length) for k, v in key_first_k.items()}

    def __len__(self) -> int:
        return len(self.indices)

    def sample_sequence(self, idx: int) -> dict[str, np.ndarray]:
        """key -> (sequence_length, ...) array, or (k, ...) for keys in ``key_first_k``.

        Unpadded full windows of a numpy-backed buffer are views; do not modify them in place."""
        buffer_start, buffer_end, sample_start, _ = (int(v) for v in self.indices[idx])
        n_data = buffer_end - buffer_start
        result = {}
        for key in self.keys:
            n_out = self.key_first_k.get(key, self.sequence_length)
            # Window step j reads buffer row clip(j - sample_start, 0, n_data - 1).
            n_read = max(min(n_out - sample_start, n_data), 1)
            src = self.replay_buffer.data[key][buffer_start : buffer_start + n_read]
            if sample_start == 0 and n_read == n_out:
                result[key] = src
            else:
                rows = np.clip(np.arange(n_out) - sample_start, 0, n_read - 1)
                result[key] = src[rows]
        return result


def split_episodes(
    n_episodes: int, val_ratio: float, max_train_episodes: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train_mask, val_mask) as the original datasets draw them: validation episodes first, then
    the training episodes downsampled to ``max_train_episodes``. The two masks never overlap."""
    if not 0 <= val_ratio < 1:
        raise ValueError(f"val_ratio={val_ratio} must be in [0, 1)")
    if max_train_episodes is not None and max_train_episodes < 1:
        raise ValueError(f"max_train_episodes={max_train_episodes} must be >= 1 or None (all)")
    val_mask = get_val_mask(n_episodes, val_ratio, seed=seed)
    train_mask = downsample_mask(~val_mask, max_train_episodes, seed=seed)
    return train_mask, val_mask
