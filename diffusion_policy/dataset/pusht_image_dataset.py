"""PushT demonstrations as 96x96 RGB frames plus agent position (image-based policy)."""

from __future__ import annotations

import copy

import numpy as np
import torch
import zarr

from diffusion_policy.common.normalize_util import get_image_range_normalizer
from diffusion_policy.common.replay_buffer import ReplayBuffer
from diffusion_policy.common.sampler import SequenceSampler, split_episodes
from diffusion_policy.dataset.base_dataset import BaseImageDataset
from diffusion_policy.dataset.pusht_dataset import check_window_args
from diffusion_policy.model.common.normalizer import LinearNormalizer

REQUIRED_KEYS = ("img", "state", "action")


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


class PushTImageDataset(BaseImageDataset):
    """Windows of ``horizon`` steps: image (3, 96, 96) in [0, 1], agent_pos (2,), action (2,).

    Frames are kept in RAM as uint8 and only for the episodes of the train and validation splits
    (``train_episodes`` / ``val_episodes``); ``replay_buffer`` holds just those episodes, in file
    order. State and action of all episodes are kept (small) for ``get_normalizer`` and
    ``get_all_actions``, which use the whole file as the original does.

    ``n_obs_steps`` (extra to the original): only the first ``n_obs_steps`` frames of each window
    are materialised, since the policy encodes only those; None keeps all ``horizon`` frames.
    """

    def __init__(
        self,
        zarr_path: str,
        horizon: int = 1,
        pad_before: int = 0,
        pad_after: int = 0,
        seed: int = 42,
        val_ratio: float = 0.0,
        max_train_episodes: int | None = None,
        n_obs_steps: int | None = None,
    ) -> None:
        super().__init__()
        check_window_args(horizon, pad_before, pad_after)
        if n_obs_steps is not None and not 1 <= n_obs_steps <= horizon:
            raise ValueError(f"n_obs_steps={n_obs_steps} must be in [1, horizon={horizon}] or None")
        source = ReplayBuffer.create_from_path(zarr_path, mode="r")
        missing = [k for k in REQUIRED_KEYS if k not in source]
        if missing:
            raise ValueError(
                f"{zarr_path}: data/{missing[0]} is missing; PushT image data needs {REQUIRED_KEYS}"
            )
        self.train_mask, self.val_mask = split_episodes(
            source.n_episodes, val_ratio, max_train_episodes, seed
        )
        self.all_state = np.asarray(source["state"][:], dtype=np.float32)
        self.all_action = np.asarray(source["action"][:], dtype=np.float32)

        used = self.train_mask | self.val_mask
        lengths = source.episode_lengths
        step_mask = np.repeat(used, lengths)
        self.replay_buffer = ReplayBuffer(
            {
                "data": {
                    "img": load_frames_uint8(source["img"], step_mask),
                    "state": self.all_state[step_mask],
                    "action": self.all_action[step_mask],
                },
                "meta": {"episode_ends": np.cumsum(lengths[used]).astype(np.int64)},
            }
        )
        self._train_mask_used = self.train_mask[used]
        self._val_mask_used = self.val_mask[used]
        self.horizon = horizon
        self.pad_before = pad_before
        self.pad_after = pad_after
        self.n_obs_steps = n_obs_steps
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
            key_first_k={"img": self.n_obs_steps} if self.n_obs_steps is not None else None,
            episode_mask=mask,
        )

    def get_validation_dataset(self) -> PushTImageDataset:
        """The validation episodes only (empty when ``val_ratio`` is 0); shares the frames in RAM."""
        val_set = copy.copy(self)
        val_set.sampler = self._make_sampler(self._val_mask_used)
        return val_set

    def get_normalizer(self, mode: str = "limits", **kwargs) -> LinearNormalizer:
        """action and agent_pos fitted on every episode of the file; image maps [0, 1] to [-1, 1]."""
        normalizer = LinearNormalizer()
        data = {"action": self.all_action, "agent_pos": self.all_state[:, :2]}
        normalizer.fit(data, last_n_dims=1, mode=mode, **kwargs)
        normalizer["image"] = get_image_range_normalizer()
        return normalizer

    def get_all_actions(self) -> torch.Tensor:
        """(N, 2) actions of every episode."""
        return torch.from_numpy(self.all_action)

    def __len__(self) -> int:
        return len(self.sampler)

    def __getitem__(self, idx: int) -> dict:
        """-> {"obs": {"image": float32 (To, 3, 96, 96) in [0, 1], "agent_pos": float32 (T, 2)},
        "action": float32 (T, 2)}, T = horizon, To = n_obs_steps or horizon."""
        sample = self.sampler.sample_sequence(idx)
        image = np.ascontiguousarray(np.moveaxis(sample["img"], -1, 1), dtype=np.float32)
        np.divide(image, 255.0, out=image)
        return {
            "obs": {
                "image": torch.from_numpy(image),
                "agent_pos": torch.from_numpy(sample["state"][:, :2].astype(np.float32)),
            },
            "action": torch.from_numpy(sample["action"].astype(np.float32)),
        }
