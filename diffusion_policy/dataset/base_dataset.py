"""Interfaces of the sequence datasets that feed the policies."""

from __future__ import annotations

import torch
import torch.utils.data

from diffusion_policy.model.common.normalizer import LinearNormalizer


class BaseLowdimDataset(torch.utils.data.Dataset):
    def get_validation_dataset(self) -> BaseLowdimDataset:
        raise NotImplementedError

    def get_normalizer(self, **kwargs) -> LinearNormalizer:
        raise NotImplementedError

    def get_all_actions(self) -> torch.Tensor:
        raise NotImplementedError

    def __len__(self) -> int:
        return 0

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        """-> {"obs": (T, Do), "action": (T, Da)}"""
        raise NotImplementedError


class BaseImageDataset(torch.utils.data.Dataset):
    def get_validation_dataset(self) -> BaseImageDataset:
        raise NotImplementedError

    def get_normalizer(self, **kwargs) -> LinearNormalizer:
        raise NotImplementedError

    def get_all_actions(self) -> torch.Tensor:
        raise NotImplementedError

    def __len__(self) -> int:
        return 0

    def __getitem__(self, idx: int) -> dict:
        """-> {"obs": {key: (T, *shape)}, "action": (T, Da)}"""
        raise NotImplementedError
