"""PushT demonstrations as 96x96 RGB frames plus agent position (image-based policy)."""

from __future__ import annotations

import numpy as np
import torch

from diffusion_policy.common.normalize_util import get_image_range_normalizer
from diffusion_policy.common.replay_buffer import ReplayBuffer
from diffusion_policy.common.sampler import split_episodes
from diffusion_policy.dataset.base_dataset import BaseImageDataset
from diffusion_policy.dataset.episode_windows import EpisodeWindows, check_window_args, episodes_in_ram
from diffusion_policy.model.common.normalizer import LinearNormalizer

REQUIRED_KEYS = ("img", "state", "action")


class PushTImageDataset(EpisodeWindows, BaseImageDataset):
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
        train_mask, val_mask = split_episodes(source.n_episodes, val_ratio, max_train_episodes, seed)
        self.all_state = np.asarray(source["state"][:], dtype=np.float32)
        self.all_action = np.asarray(source["action"][:], dtype=np.float32)
        used = train_mask | val_mask
        low_dim = {"state": self.all_state, "action": self.all_action}
        replay_buffer = episodes_in_ram(source, ["img"], low_dim, used)
        self.n_obs_steps = n_obs_steps
        first_k = {"img": n_obs_steps} if n_obs_steps is not None else None
        self.init_windows(replay_buffer, horizon, pad_before, pad_after, train_mask, val_mask, used, first_k)

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
