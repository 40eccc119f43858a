"""What every sequence dataset here does the same way: ``horizon``-step windows over the episodes of a
ReplayBuffer, training windows in ``sampler`` and the validation episodes' in ``get_validation_dataset()``,
with only the episodes a split uses kept in RAM (images as uint8)."""

from __future__ import annotations

import copy

import numpy as np
import zarr

from diffusion_policy.common.replay_buffer import ReplayBuffer
from diffusion_policy.common.sampler import SequenceSampler


def check_window_args(horizon: int, pad_before: int, pad_after: int) -> None:
    if horizon < 1:
        raise ValueError(f"horizon={horizon} must be >= 1")
    if pad_before < 0 or pad_after < 0:
        raise ValueError(f"pad_before={pad_before} and pad_after={pad_after} must be >= 0")


def load_frames_uint8(img: zarr.Array | np.ndarray, step_mask: np.ndarray) -> np.ndarray:
    """The rows of ``img`` (N, H, W, C) where ``step_mask`` is True, as uint8.

    Reads one storage chunk at a time, so the float32 array (2.8 GB for PushT) never exists in
    RAM; chunks without selected rows are not read at all. Values must be integers in [0, 255].
    """
    n = img.shape[0]
    if step_mask.shape != (n,):
        raise ValueError(f"step_mask has shape {step_mask.shape}, expected ({n},)")
    out = np.empty((int(step_mask.sum()), *img.shape[1:]), dtype=np.uint8)
    chunk_len = img.chunks[0] if isinstance(img, zarr.Array) else 256
    pos = 0
    for start in range(0, n, chunk_len):
        rows = np.nonzero(step_mask[start : start + chunk_len])[0]
        if rows.size == 0:
            continue
        block = np.asarray(img[start : start + chunk_len])[rows]
        if block.dtype != np.uint8:
            converted = block.astype(np.uint8)
            if not np.array_equal(converted, block):
                raise ValueError(
                    f"data/img rows {start}..{start + chunk_len} hold values that are not integers in "
                    f"[0, 255] (dtype {block.dtype}); PushT images must be 0..255 RGB"
                )
            block = converted
        out[pos : pos + rows.size] = block
        pos += rows.size
    return out


def episodes_in_ram(
    source: ReplayBuffer, rgb_keys: list[str], low_dim: dict[str, np.ndarray], used: np.ndarray
) -> ReplayBuffer:
    """The episodes where ``used`` (one flag per episode of ``source``) is True, in RAM: rgb keys read from
    ``source`` as uint8 frames, low-dim arrays (covering every step of ``source``) cut to the same steps."""
    lengths = source.episode_lengths
    step_mask = np.repeat(used, lengths)
    data = {k: load_frames_uint8(source[k], step_mask) for k in rgb_keys}
    data.update({k: v[step_mask] for k, v in low_dim.items()})
    return ReplayBuffer({"data": data, "meta": {"episode_ends": np.cumsum(lengths[used]).astype(np.int64)}})


class EpisodeWindows:
    """Mixin of the sequence datasets: call :meth:`init_windows` at the end of ``__init__``."""

    def init_windows(
        self,
        replay_buffer: ReplayBuffer,
        horizon: int,
        pad_before: int,
        pad_after: int,
        train_mask: np.ndarray,
        val_mask: np.ndarray,
        used: np.ndarray | None = None,
        first_k: dict[str, int] | None = None,
    ) -> None:
        """``train_mask`` / ``val_mask``: one flag per episode of the file; ``used``: which of the file's
        episodes ``replay_buffer`` holds (None: all of them); ``first_k``: keys of which only the first k
        steps of a window are read (the observation frames a policy encodes)."""
        self.replay_buffer = replay_buffer
        self.train_mask, self.val_mask = train_mask, val_mask
        kept = slice(None) if used is None else used
        self._train_mask_used, self._val_mask_used = train_mask[kept], val_mask[kept]
        self.horizon, self.pad_before, self.pad_after = horizon, pad_before, pad_after
        self._first_k = first_k
        self.sampler = self._make_sampler(self._train_mask_used)

    @property
    def train_episodes(self) -> np.ndarray:
        return np.nonzero(self.train_mask)[0]

    @property
    def val_episodes(self) -> np.ndarray:
        return np.nonzero(self.val_mask)[0]

    def _make_sampler(self, mask: np.ndarray) -> SequenceSampler:
        return SequenceSampler(
            self.replay_buffer,
            sequence_length=self.horizon,
            pad_before=self.pad_before,
            pad_after=self.pad_after,
            key_first_k=self._first_k,
            episode_mask=mask,
        )

    def get_validation_dataset(self):
        """The validation episodes only (empty when there are none); shares the data in RAM."""
        val_set = copy.copy(self)
        val_set.sampler = self._make_sampler(self._val_mask_used)
        return val_set

    def __len__(self) -> int:
        return len(self.sampler)
