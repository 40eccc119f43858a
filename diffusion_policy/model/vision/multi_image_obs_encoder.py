"""Pure-torch observation encoder of the original's ``train_diffusion_unet_image_workspace`` recipe.

Each rgb key goes through its own transform (optional resize -> crop -> optional ImageNet normalisation)
and its own copy of a torchvision backbone (``get_resnet``: global-average-pooled features), or all rgb keys
through one shared backbone. Low-dim keys are appended unchanged. Submodule names are the original's
(``key_model_map.<key>.*``, ``key_transform_map.<key>.*``), so its checkpoints' ``obs_encoder.*`` keys match.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torchvision
from torch import nn

from diffusion_policy.model.common.module_attr_mixin import ModuleAttrMixin
from diffusion_policy.model.vision.crop_randomizer import CropRandomizer
from diffusion_policy.model.vision.group_norm import replace_batchnorm_with_groupnorm
from diffusion_policy.model.vision.obs_shape_meta import parse_obs_meta

SHARED_KEY = "rgb"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageNetNormalize(nn.Module):
    """(N, 3, H, W) -> (x - mean) / std per channel with ImageNet's statistics; no parameters or buffers
    (like torchvision's Normalize, but it also runs on the ``meta`` device)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).reshape(-1, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).reshape(-1, 1, 1)
        return (x - mean) / std


def _per_key_hw(value: Any, key: str, what: str) -> tuple[int, int] | None:
    """``resize_shape`` / ``crop_shape`` for one key: None, [h, w], or a dict {key: [h, w]}."""
    if isinstance(value, Mapping):
        value = value.get(key)
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or len(value) != 2:
        raise ValueError(
            f"MultiImageObsEncoder: {what}={value!r} for '{key}' must be [height, width] or null"
        )
    h, w = (int(v) for v in value)
    if h <= 0 or w <= 0:
        raise ValueError(f"MultiImageObsEncoder: {what}={[h, w]} for '{key}' must be positive")
    return h, w


class MultiImageObsEncoder(ModuleAttrMixin):
    """Encodes one observation step per sample: {key: (N, *shape)} -> (N, output_shape()[0]).

    Args:
        shape_meta: the task's shape_meta; ``shape_meta["obs"]`` maps key -> {"shape": [...],
            "type": "rgb" | "low_dim"} (type defaults to low_dim, as in the original).
        rgb_model: backbone (N, C, h, w) -> (N, D) deep-copied per rgb key, or a dict {rgb key: module}
            used as given. With ``share_rgb_model`` the one module is used for every rgb key.
        resize_shape: [h, w] (or {key: [h, w]}) to resize rgb inputs to first, or None.
        crop_shape: [h, w] (or {key: [h, w]}) crop after the resize, or None.
        random_crop: random crop in train mode and center crop in eval (``CropRandomizer``); False: always
            the center crop. (The original meant the same but, by a slip, did no crop at all then.)
        use_group_norm: replace every BatchNorm2d(C) of the backbones by GroupNorm(C // 16, C). Applied to
            the shared backbone too (the original left a shared backbone's BatchNorm in place).
        share_rgb_model: one backbone (``key_model_map.rgb``) for all rgb keys, run as one batch.
        imagenet_norm: normalise rgb with the ImageNet mean/std after cropping.

    rgb features come first in sorted key order, then the low-dim keys in sorted order.
    """

    def __init__(
        self,
        shape_meta: Mapping,
        rgb_model: nn.Module | Mapping[str, nn.Module],
        resize_shape: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
        crop_shape: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
        random_crop: bool = True,
        use_group_norm: bool = False,
        share_rgb_model: bool = False,
        imagenet_norm: bool = False,
    ) -> None:
        super().__init__()
        obs_meta = shape_meta.get("obs") if isinstance(shape_meta, Mapping) else None
        if not obs_meta:
            raise ValueError(
                "MultiImageObsEncoder: shape_meta['obs'] is missing or empty; "
                "list the obs keys with their shape and type"
            )
        if share_rgb_model and not isinstance(rgb_model, nn.Module):
            raise ValueError(
                "MultiImageObsEncoder: share_rgb_model=True needs one rgb_model module, not a dict"
            )
        if not isinstance(rgb_model, (nn.Module, Mapping)):
            raise ValueError(
                f"MultiImageObsEncoder: rgb_model must be an nn.Module or a dict of them, "
                f"got {type(rgb_model).__name__}"
            )

        key_shapes: dict[str, tuple[int, ...]] = {}
        rgb_keys, low_dim_keys = [], []
        for key, (shape, obs_type) in parse_obs_meta(obs_meta).items():
            key_shapes[key] = shape
            (rgb_keys if obs_type == "rgb" else low_dim_keys).append(key)

        key_model_map = nn.ModuleDict()
        if share_rgb_model:
            key_model_map[SHARED_KEY] = self._prepare(rgb_model, use_group_norm)
        key_transform_map = nn.ModuleDict()
        # shape_meta order, as the original inserts them: it is the order of parameters() and so of the
        # optimizer state in its checkpoints (features are still concatenated in sorted key order)
        for key in rgb_keys:
            if not share_rgb_model:
                if isinstance(rgb_model, Mapping):
                    if key not in rgb_model:
                        raise ValueError(
                            f"MultiImageObsEncoder: rgb_model dict has no entry for rgb key '{key}' "
                            f"(has {sorted(rgb_model)})"
                        )
                    model = rgb_model[key]
                else:
                    model = copy.deepcopy(rgb_model)
                key_model_map[key] = self._prepare(model, use_group_norm)
            key_transform_map[key] = self._transform(
                key, key_shapes[key], resize_shape, crop_shape, random_crop, imagenet_norm
            )

        self.key_model_map = key_model_map
        self.key_transform_map = key_transform_map
        self.key_shape_map = key_shapes
        self.share_rgb_model = share_rgb_model
        self.rgb_keys = sorted(rgb_keys)
        self.low_dim_keys = sorted(low_dim_keys)

    @staticmethod
    def _prepare(model: nn.Module, use_group_norm: bool) -> nn.Module:
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"MultiImageObsEncoder: rgb_model entries must be nn.Modules, got {type(model).__name__}"
            )
        return replace_batchnorm_with_groupnorm(model) if use_group_norm else model

    @staticmethod
    def _transform(
        key: str,
        shape: tuple[int, int, int],
        resize_shape: Any,
        crop_shape: Any,
        random_crop: bool,
        imagenet_norm: bool,
    ) -> nn.Sequential:
        """(N, C, H, W) -> (N, C, h, w): Sequential(resize, crop, normalize), Identity for each one unused."""
        channels, height, width = shape
        resizer: nn.Module = nn.Identity()
        resize = _per_key_hw(resize_shape, key, "resize_shape")
        if resize is not None:
            height, width = resize
            resizer = torchvision.transforms.Resize(size=(height, width), antialias=True)
        cropper: nn.Module = nn.Identity()
        crop = _per_key_hw(crop_shape, key, "crop_shape")
        if crop is not None:
            if crop[0] > height or crop[1] > width:
                raise ValueError(
                    f"MultiImageObsEncoder: crop {crop} does not fit the {(height, width)} image of '{key}'; "
                    "use a crop_shape no larger than the (resized) image"
                )
            if random_crop:
                cropper = CropRandomizer((channels, height, width), crop[0], crop[1])
            else:
                cropper = torchvision.transforms.CenterCrop(size=crop)
        # The policy has already mapped images to [-1, 1], so this ImageNet normalisation is applied on top
        # of that (not to [0, 1] images as ImageNet expects). It is the original's behaviour, kept so its
        # checkpoints see the inputs they were trained on.
        normalizer: nn.Module = nn.Identity()
        if imagenet_norm:
            if channels != 3:
                raise ValueError(
                    f"MultiImageObsEncoder: imagenet_norm needs 3-channel images, '{key}' has {channels}"
                )
            normalizer = ImageNetNormalize()
        return nn.Sequential(resizer, cropper, normalizer)

    def _check(self, obs_dict: Mapping[str, torch.Tensor], key: str, batch: int | None) -> torch.Tensor:
        if key not in obs_dict:
            raise KeyError(f"observation '{key}' from shape_meta is missing (got keys {sorted(obs_dict)})")
        x = obs_dict[key]
        if tuple(x.shape[1:]) != self.key_shape_map[key]:
            raise ValueError(
                f"observation '{key}' has shape {tuple(x.shape[1:])} per sample, "
                f"shape_meta says {self.key_shape_map[key]}"
            )
        if batch is not None and x.shape[0] != batch:
            raise ValueError(f"observation '{key}' has batch size {x.shape[0]}, other keys have {batch}")
        return x

    def forward(self, obs_dict: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """obs_dict[key]: (N, *shape) (rgb normalized to [-1, 1]) -> (N, F), F = output_shape()[0]."""
        batch = None
        images = {}
        for key in self.rgb_keys:
            x = self._check(obs_dict, key, batch)
            batch = x.shape[0]
            images[key] = self.key_transform_map[key](x)
        features = []
        if self.share_rgb_model and images:
            # every camera in one backbone call: (K * N, C, h, w) -> (K, N, D) -> (N, K * D), key-major
            stacked = self.key_model_map[SHARED_KEY](torch.cat(list(images.values()), dim=0))
            stacked = stacked.reshape(len(images), batch, -1)
            features.append(stacked.transpose(0, 1).reshape(batch, -1))
        else:
            features += [self.key_model_map[key](img).flatten(1) for key, img in images.items()]
        for key in self.low_dim_keys:
            x = self._check(obs_dict, key, batch)
            batch = x.shape[0]
            features.append(x.flatten(1))
        return torch.cat(features, dim=-1)

    @torch.no_grad()
    def output_shape(self) -> tuple[int, ...]:
        """Feature shape per sample, (F,), found with a forward pass on one all-zero observation."""
        dummy = {
            key: torch.zeros((1, *shape), dtype=self.dtype, device=self.device)
            for key, shape in self.key_shape_map.items()
        }
        was_training = self.training
        self.eval()  # no random crop, no BatchNorm statistics update
        try:
            return tuple(self.forward(dummy).shape[1:])
        finally:
            self.train(was_training)
