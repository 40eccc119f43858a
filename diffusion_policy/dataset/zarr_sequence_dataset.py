"""Any ReplayBuffer zarr as windows of the observation and action keys a task's ``shape_meta`` names.

The zarr holds ``data/<obs key>`` for every key of ``shape_meta.obs`` and ``data/action``: rgb keys as
(N, H, W, C) frames with integer values 0..255 (uint8, or float as in the PushT file), low-dim keys as
(N, *shape). ``import_dataset.py`` and ``demo_pusht.py`` write such files and print the matching
``shape_meta``. An optional ``meta/val_mask`` (E,) bool array is the file's own train/validation split (a
robomimic ``mask/valid``, for instance).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from diffusion_policy.common.normalize_util import get_image_range_normalizer
from diffusion_policy.common.replay_buffer import ReplayBuffer
from diffusion_policy.common.sampler import downsample_mask, split_episodes
from diffusion_policy.dataset.base_dataset import BaseImageDataset
from diffusion_policy.dataset.episode_windows import EpisodeWindows, check_window_args, episodes_in_ram
from diffusion_policy.model.common.normalizer import LinearNormalizer

ACTION_KEY = "action"
VAL_MASK_KEY = "val_mask"


def parse_shape_meta(
    shape_meta: Mapping,
) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]], int]:
    """(rgb key -> (C, H, W), low-dim key -> shape, action dim), in ``shape_meta`` order."""
    rgb, low_dim = {}, {}
    for key, meta in shape_meta["obs"].items():
        shape = tuple(int(s) for s in meta["shape"])
        kind = meta.get("type", "low_dim")
        if kind == "rgb":
            if len(shape) != 3:
                raise ValueError(f"shape_meta.obs.{key}: an rgb key needs shape [C, H, W], got {list(shape)}")
            rgb[key] = shape
        elif kind == "low_dim":
            low_dim[key] = shape
        else:
            raise ValueError(f"shape_meta.obs.{key}.type={kind!r}: use 'rgb' or 'low_dim'")
    action_shape = tuple(int(s) for s in shape_meta["action"]["shape"])
    if len(action_shape) != 1:
        raise ValueError(f"shape_meta.action.shape must be [action_dim], got {list(action_shape)}")
    return rgb, low_dim, action_shape[0]


class ZarrSequenceDataset(EpisodeWindows, BaseImageDataset):
    """Windows of ``horizon`` steps, ``{"obs": {key: ...}, "action": (T, Da)}``, for ``shape_meta``'s keys.

    rgb keys come out as float32 (To, C, H, W) in [0, 1], low-dim keys as float32 (T, *shape). Frames are kept
    in RAM as uint8 and only for the episodes the split uses; low-dim keys and actions of every episode are
    kept for the normalizer, which (as for PushT and in the original) is fitted on the whole file.

    Split: validation episodes are the file's ``meta/val_mask`` when it has one and ``use_file_split``, else
    ``round(E * val_ratio)`` drawn with ``seed``; then at most ``max_train_episodes`` of the others train.
    With the same file, seed and arguments the windows equal ``PushTImageDataset``'s (tested).
    ``n_obs_steps``: only the first ``n_obs_steps`` frames of an rgb key are materialised (None: all).
    """

    def __init__(
        self,
        zarr_path: str,
        shape_meta: Mapping,
        horizon: int = 1,
        pad_before: int = 0,
        pad_after: int = 0,
        n_obs_steps: int | None = None,
        seed: int = 42,
        val_ratio: float = 0.0,
        max_train_episodes: int | None = None,
        use_file_split: bool = True,
    ) -> None:
        super().__init__()
        check_window_args(horizon, pad_before, pad_after)
        if n_obs_steps is not None and not 1 <= n_obs_steps <= horizon:
            raise ValueError(f"n_obs_steps={n_obs_steps} must be in [1, horizon={horizon}] or None")
        self.rgb_shapes, self.low_dim_shapes, action_dim = parse_shape_meta(shape_meta)
        source = ReplayBuffer.create_from_path(zarr_path, mode="r")
        self._check_keys(source, zarr_path, action_dim)

        n_episodes = source.n_episodes
        if use_file_split and VAL_MASK_KEY in source.meta:
            val_mask = np.asarray(source.meta[VAL_MASK_KEY][:], dtype=bool)
            if val_mask.shape != (n_episodes,):
                raise ValueError(
                    f"{zarr_path}: meta/{VAL_MASK_KEY} has shape {val_mask.shape}, expected ({n_episodes},) "
                    "(one flag per episode)"
                )
            train_mask = downsample_mask(~val_mask, max_train_episodes, seed=seed)
        else:
            train_mask, val_mask = split_episodes(n_episodes, val_ratio, max_train_episodes, seed)

        low_keys = [*self.low_dim_shapes, ACTION_KEY]
        self.all_low_dim = {k: np.asarray(source[k][:], dtype=np.float32) for k in low_keys}
        used = train_mask | val_mask
        replay_buffer = episodes_in_ram(source, list(self.rgb_shapes), self.all_low_dim, used)
        self.n_obs_steps = n_obs_steps
        first_k = dict.fromkeys(self.rgb_shapes, n_obs_steps) if n_obs_steps is not None else None
        self.init_windows(replay_buffer, horizon, pad_before, pad_after, train_mask, val_mask, used, first_k)

    def _check_keys(self, source: ReplayBuffer, zarr_path: str, action_dim: int) -> None:
        hint = "; print the file's keys with import_dataset.py --describe, or fix task.shape_meta"
        expected = {k: (s[1], s[2], s[0]) for k, s in self.rgb_shapes.items()}
        expected.update(self.low_dim_shapes)
        expected[ACTION_KEY] = (action_dim,)
        for key, shape in expected.items():
            if key not in source:
                raise ValueError(
                    f"{zarr_path}: data/{key} is missing (shape_meta names it); the file has "
                    f"{sorted(source.keys())}{hint}"
                )
            actual = tuple(source[key].shape[1:])
            if actual != shape:
                layout = " (rgb frames are stored (H, W, C))" if key in self.rgb_shapes else ""
                raise ValueError(
                    f"{zarr_path}: data/{key} has per-step shape {list(actual)} but shape_meta asks for "
                    f"{list(shape)}{layout}{hint}"
                )

    def get_normalizer(self, mode: str = "limits", **kwargs) -> LinearNormalizer:
        """Low-dim keys and action fitted on every episode of the file; rgb keys map [0, 1] to [-1, 1]."""
        normalizer = LinearNormalizer()
        normalizer.fit(self.all_low_dim, last_n_dims=1, mode=mode, **kwargs)
        for key in self.rgb_shapes:
            normalizer[key] = get_image_range_normalizer()
        return normalizer

    def get_all_actions(self) -> torch.Tensor:
        return torch.from_numpy(self.all_low_dim[ACTION_KEY])

    def __getitem__(self, idx: int) -> dict:
        sample = self.sampler.sample_sequence(idx)
        obs = {}
        for key in self.rgb_shapes:
            image = np.ascontiguousarray(np.moveaxis(sample[key], -1, 1), dtype=np.float32)
            np.divide(image, 255.0, out=image)
            obs[key] = torch.from_numpy(image)
        for key in self.low_dim_shapes:
            obs[key] = torch.from_numpy(np.asarray(sample[key], dtype=np.float32))
        return {"obs": obs, "action": torch.from_numpy(np.asarray(sample[ACTION_KEY], dtype=np.float32))}
