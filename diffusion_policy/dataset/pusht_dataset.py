"""PushT demonstrations as keypoint observations (state-based policy)."""

from __future__ import annotations

import numpy as np
import torch

from diffusion_policy.common.replay_buffer import ReplayBuffer
from diffusion_policy.common.sampler import split_episodes
from diffusion_policy.dataset.base_dataset import BaseLowdimDataset
from diffusion_policy.dataset.episode_windows import EpisodeWindows, check_window_args
from diffusion_policy.model.common.normalizer import LinearNormalizer


class PushTLowdimDataset(EpisodeWindows, BaseLowdimDataset):
    """Windows of ``horizon`` steps over the PushT zarr, loaded into RAM (a few MB).

    obs = the 9 block keypoints flattened (18) + agent position (2) = 20 dims; action = 2 dims.
    The split follows the original: ``round(206 * val_ratio)`` validation episodes drawn with
    ``seed``, then at most ``max_train_episodes`` training episodes drawn from the rest.
    ``train_episodes`` / ``val_episodes`` list the episode indices of each split.
    """

    def __init__(
        self,
        zarr_path: str,
        horizon: int = 1,
        pad_before: int = 0,
        pad_after: int = 0,
        obs_key: str = "keypoint",
        state_key: str = "state",
        action_key: str = "action",
        seed: int = 42,
        val_ratio: float = 0.0,
        max_train_episodes: int | None = None,
    ) -> None:
        super().__init__()
        check_window_args(horizon, pad_before, pad_after)
        replay_buffer = ReplayBuffer.copy_from_path(zarr_path, keys=[obs_key, state_key, action_key])
        self.obs_key = obs_key
        self.state_key = state_key
        self.action_key = action_key
        train_mask, val_mask = split_episodes(replay_buffer.n_episodes, val_ratio, max_train_episodes, seed)
        self.init_windows(replay_buffer, horizon, pad_before, pad_after, train_mask, val_mask)

    def _sample_to_data(self, sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keypoint = sample[self.obs_key]
        agent_pos = sample[self.state_key][:, :2]
        obs = np.concatenate([keypoint.reshape(keypoint.shape[0], -1), agent_pos], axis=-1)
        return {"obs": obs.astype(np.float32), "action": sample[self.action_key].astype(np.float32)}

    def get_normalizer(self, mode: str = "limits", **kwargs) -> LinearNormalizer:
        """Fitted on every episode of the file, as the original (so checkpoints stay comparable)."""
        data = self._sample_to_data({k: self.replay_buffer[k] for k in self.replay_buffer})
        normalizer = LinearNormalizer()
        normalizer.fit(data, last_n_dims=1, mode=mode, **kwargs)
        return normalizer

    def get_all_actions(self) -> torch.Tensor:
        """(N, 2) actions of every episode."""
        return torch.from_numpy(np.asarray(self.replay_buffer[self.action_key], dtype=np.float32))

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        """-> {"obs": float32 (horizon, 20), "action": float32 (horizon, 2)}"""
        data = self._sample_to_data(self.sampler.sample_sequence(idx))
        return {k: torch.from_numpy(v) for k, v in data.items()}
