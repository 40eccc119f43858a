"""Image backbones by name, for configs: `_target_: diffusion_policy.model.vision.model_getter.get_resnet`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn


def _resolve_weights(name: str, weights: Any) -> Any:
    """A torchvision weights enum for ``weights`` ("IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1", ...)."""
    try:
        return torchvision.models.get_model_weights(name).verify(weights)
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(
            f"get_resnet: unknown weights {weights!r} for {name} ({' '.join(str(e).split())}); "
            "use weights=null for random initialisation"
        ) from None


def get_resnet(name: str, weights: Any = None, **kwargs: Any) -> nn.Module:
    """torchvision classification model ``name`` (e.g. "resnet18") with ``fc`` replaced by Identity.

    (N, 3, H, W) -> (N, D) globally average-pooled features, D = 512 for resnet18/34, 2048 for resnet50+.
    ``weights=None`` gives a random initialisation (what the original's configs use). Pretrained weights
    (e.g. "IMAGENET1K_V1") are loaded through torch hub: downloaded once, or read from its cache
    (``<torch.hub.get_dir()>/checkpoints``) when there is no network. Other keyword arguments go to the
    torchvision constructor.
    """
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        resnets = [m for m in available if "resnet" in m]
        raise ValueError(
            f"get_resnet: unknown model name {name!r}; use a torchvision ResNet such as {resnets}"
        )
    builder = torchvision.models.get_model_builder(name)
    if weights is not None:
        weights = _resolve_weights(name, weights)
    try:
        model = builder(weights=weights, **kwargs)
    except (OSError, RuntimeError) as e:
        # URLError (no network) is an OSError; a truncated or corrupt download fails in torch.load
        if weights is None:
            raise
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        file_name = Path(weights.url).name
        reason = " ".join(str(e).split())
        raise ValueError(
            f"get_resnet: cannot load pretrained weights {name} {weights} ({reason}); use weights=null "
            f"for random initialisation, or put {file_name} (from {weights.url}) in {cache}"
        ) from None
    if not isinstance(getattr(model, "fc", None), nn.Module):
        raise ValueError(f"get_resnet: torchvision model {name!r} has no 'fc' head to remove; use a ResNet")
    model.fc = nn.Identity()
    return model
