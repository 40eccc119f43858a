"""Image backbones by name, for configs: `_target_: diffusion_policy.model.vision.model_getter.get_resnet`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from diffusion_policy.common.errors import one_line


def _resolve_weights(name: str, weights: Any) -> Any:
    """A torchvision weights enum for ``weights`` ("IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1", ...)."""
    try:
        return torchvision.models.get_model_weights(name).verify(weights)
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(
            f"get_resnet: unknown weights {weights!r} for {name} ({one_line(e)}); "
            "use weights=null for random initialisation"
        ) from None


# the torchvision ResNets built of BasicBlocks, whose channel width narrow_resnet can change
NARROW_RESNET_LAYERS = {"resnet18": [2, 2, 2, 2], "resnet34": [3, 4, 6, 3]}


def narrow_resnet(name: str, width: int, num_classes: int = 1000) -> torchvision.models.ResNet:
    """torchvision's ``name`` ("resnet18" or "resnet34") with ``width`` channels in the stem and first stage
    instead of 64; the later stages double it as usual (2, 4, 8 x ``width``), so the last feature map has
    ``8 * width`` channels. Same block structure, strides and initialisation as torchvision; random init
    only. Convolution cost scales with ``width ** 2``: width 32 is about a quarter of ResNet-18's FLOPs.
    """
    if name not in NARROW_RESNET_LAYERS:
        raise ValueError(f"width: only {sorted(NARROW_RESNET_LAYERS)} can be narrowed, not {name!r}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width={width!r} must be a positive integer (torchvision's is 64)")
    block = torchvision.models.resnet.BasicBlock
    layers = NARROW_RESNET_LAYERS[name]
    # build torchvision's module (its forward, attribute names and _make_layer), then swap in narrow parts
    model = torchvision.models.ResNet(block, layers, num_classes=num_classes)
    model.inplanes = width
    model.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(width)
    model.layer1 = model._make_layer(block, width, layers[0])
    model.layer2 = model._make_layer(block, 2 * width, layers[1], stride=2)
    model.layer3 = model._make_layer(block, 4 * width, layers[2], stride=2)
    model.layer4 = model._make_layer(block, 8 * width, layers[3], stride=2)
    model.fc = nn.Linear(8 * width, num_classes)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    return model


def get_resnet(name: str, weights: Any = None, width: int | None = None, **kwargs: Any) -> nn.Module:
    """torchvision classification model ``name`` (e.g. "resnet18") with ``fc`` replaced by Identity.

    (N, 3, H, W) -> (N, D) globally average-pooled features, D = 512 for resnet18/34, 2048 for resnet50+.
    ``weights=None`` gives a random initialisation (what the original's configs use). Pretrained weights
    (e.g. "IMAGENET1K_V1") are loaded through torch hub: downloaded once, or read from its cache
    (``<torch.hub.get_dir()>/checkpoints``) when there is no network. Other keyword arguments go to the
    torchvision constructor.

    ``width`` (not in the original): base channel count of resnet18/34 (torchvision: 64; None keeps
    torchvision's model as is); D = 8 * width. Random init only. With ``use_group_norm`` in the encoder,
    use a multiple of 16 (GroupNorm has C // 16 groups).
    """
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        resnets = [m for m in available if "resnet" in m]
        raise ValueError(
            f"get_resnet: unknown model name {name!r}; use a torchvision ResNet such as {resnets}"
        )
    if width is not None and width != 64:
        if weights is not None:
            raise ValueError(f"get_resnet: width={width} has no pretrained weights; use weights=null")
        if kwargs:
            raise ValueError(f"get_resnet: width={width} takes no other constructor arguments, got {kwargs}")
        model = narrow_resnet(name, width)
        model.fc = nn.Identity()
        return model
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
        raise ValueError(
            f"get_resnet: cannot load pretrained weights {name} {weights} ({one_line(e)}); use weights=null "
            f"for random initialisation, or put {file_name} (from {weights.url}) in {cache}"
        ) from None
    if not isinstance(getattr(model, "fc", None), nn.Module):
        raise ValueError(f"get_resnet: torchvision model {name!r} has no 'fc' head to remove; use a ResNet")
    model.fc = nn.Identity()
    return model
