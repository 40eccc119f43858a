"""``nn.Module`` mixin exposing the module's device and dtype."""

from __future__ import annotations

import torch
from torch import nn


class ModuleAttrMixin(nn.Module):
    """Adds ``.device`` and ``.dtype`` read from the module's first parameter.

    A zero-size dummy parameter guarantees there always is one, even for modules
    whose real parameters are created later.
    """

    def __init__(self) -> None:
        super().__init__()
        self._dummy_variable = nn.Parameter(torch.empty(0))

    @property
    def device(self) -> torch.device:
        return next(iter(self.parameters())).device

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.parameters())).dtype
