"""BatchNorm -> GroupNorm swap shared by the image encoders.

EMA averages parameters but not BatchNorm running statistics, so the image recipes (which train with EMA)
replace every BatchNorm2d of their ResNets by a GroupNorm with 16 channels per group.
"""

from __future__ import annotations

from torch import nn


def replace_batchnorm_with_groupnorm(module: nn.Module) -> nn.Module:
    """Swap every BatchNorm2d(C) for GroupNorm(C // 16, C), in place; returns ``module``.

    A module that is itself a BatchNorm2d cannot be swapped in place; it is returned replaced.
    """
    if isinstance(module, nn.BatchNorm2d):
        return nn.GroupNorm(module.num_features // 16, module.num_features)
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.GroupNorm(child.num_features // 16, child.num_features))
        else:
            replace_batchnorm_with_groupnorm(child)
    return module
