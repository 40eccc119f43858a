"""Interfaces of the sequence datasets that feed the policies."""

from __future__ import annotations

import torch
import torch.utils.data

from diffusion_policy.model.common.normalizer import LinearNormalizer


class BaseSequenceDataset(torch.utils.data.Dataset):
    """What the training loop asks of every dataset: windows, the validation split, the normalizer."""

    def get_validation_dataset(self) -> BaseSequenceDataset:
        raise NotImplementedError

    def get_normalizer(self, **kwargs) -> LinearNormalizer:
        raise NotImplementedError

    def get_all_actions(self) -> torch.Tensor:
        raise NotImplementedError

    def __len__(self) -> int:
        return 0


class BaseLowdimDataset(BaseSequenceDataset):
    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        """-> {"obs": (T, Do), "action": (T, Da)}"""
        raise NotImplementedError


class BaseImageDataset(BaseSequenceDataset):
    def __getitem__(self, idx: int) -> dict:
        """-> {"obs": {key: (T, *shape)}, "action": (T, Da)}"""
        raise NotImplementedError
