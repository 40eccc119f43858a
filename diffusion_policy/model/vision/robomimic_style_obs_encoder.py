"""Image + low-dim observation encoder of the hybrid diffusion policy, without the robomimic dependency.

It rebuilds what the original obtained from robomimic 0.2.0 (``ObservationEncoder`` with a ``VisualCore``
per rgb key) from torchvision parts. Submodule names mirror robomimic's, so the original hybrid
checkpoints' ``obs_encoder.*`` keys line up:
``obs_nets.<key>.backbone.nets.*`` (ResNet-18 trunk), ``obs_nets.<key>.pool.*`` (SpatialSoftmax),
``obs_nets.<key>.nets.3.*`` (Linear), ``obs_randomizers.<key>``.

Per rgb key (C, H, W) in [-1, 1]: crop -> ResNet-18 conv1..layer4 (no avgpool/fc) -> SpatialSoftmax
(32 keypoints, fixed temperature 1) -> flatten (64) -> Linear(64, feature_dim) -> ReLU.
Low-dim keys are passed through unchanged. Features are concatenated in ``obs_shape_meta`` order:
PushT (image [3,96,96], agent_pos [2]) gives 64 + 2 = 66 features.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torchvision
from torch import nn

from diffusion_policy.model.vision.crop_randomizer import CropRandomizer
from diffusion_policy.model.vision.group_norm import replace_batchnorm_with_groupnorm
from diffusion_policy.model.vision.model_getter import narrow_resnet
from diffusion_policy.model.vision.obs_shape_meta import parse_obs_meta
from diffusion_policy.model.vision.spatial_softmax import SpatialSoftmax

# replace_batchnorm_with_groupnorm (now in group_norm.py) stays importable from this module


class ResNet18Conv(nn.Module):
    """torchvision ResNet-18 (random init) minus avgpool and fc: (N, 3, H, W) -> (N, 8 * width, H/32, W/32).

    ``width`` (not in the original): base channel count, 64 as torchvision (512 output channels); a
    narrower trunk costs about (width / 64) ** 2 of the convolutions. Use a multiple of 16 with GroupNorm.
    """

    def __init__(self, use_group_norm: bool = False, width: int = 64) -> None:
        super().__init__()
        resnet = (
            torchvision.models.resnet18(weights=None) if width == 64 else narrow_resnet("resnet18", width)
        )
        self.nets = nn.Sequential(*list(resnet.children())[:-2])
        if use_group_norm:
            replace_batchnorm_with_groupnorm(self.nets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nets(x)


class VisualCore(nn.Module):
    """Backbone -> SpatialSoftmax -> flatten -> Linear for one camera: (N, C, H, W) -> (N, feature_dim)."""

    def __init__(
        self,
        input_shape: Sequence[int],
        feature_dim: int,
        num_kp: int,
        use_group_norm: bool,
        backbone_width: int = 64,
    ) -> None:
        super().__init__()
        self.backbone = ResNet18Conv(use_group_norm=use_group_norm, width=backbone_width)
        with torch.no_grad():
            feat_shape = self.backbone(torch.zeros(1, *input_shape)).shape[1:]
        self.pool = SpatialSoftmax(feat_shape, num_kp=num_kp, temperature=1.0)
        # registered twice (as robomimic does) so both key families of its checkpoints exist
        self.nets = nn.Sequential(self.backbone, self.pool, nn.Flatten(1), nn.Linear(num_kp * 2, feature_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nets(x)


class RobomimicStyleObsEncoder(nn.Module):
    """Encodes one observation step per sample: {key: (N, *shape)} -> (N, output_dim).

    Args:
        obs_shape_meta: ``shape_meta["obs"]``: key -> {"shape": [...], "type": "rgb" | "low_dim"}
            (type defaults to low_dim, as in the original).
        crop_shape: (h, w) crop for rgb keys, or None for no crop.
        use_group_norm: replace BatchNorm2d by GroupNorm(C // 16) in the ResNet trunks.
        eval_fixed_crop: center crop in eval mode; False keeps random crops in eval (robomimic behaviour).
        feature_dim: output size per rgb key.
        num_keypoints: SpatialSoftmax keypoints per rgb key.
        backbone_width: base channel count of the ResNet-18 trunks (64, the original's, by default);
            not in the original.
    """

    def __init__(
        self,
        obs_shape_meta: Mapping[str, Mapping],
        crop_shape: Sequence[int] | None = None,
        use_group_norm: bool = False,
        eval_fixed_crop: bool = False,
        feature_dim: int = 64,
        num_keypoints: int = 32,
        backbone_width: int = 64,
    ) -> None:
        super().__init__()
        if not obs_shape_meta:
            raise ValueError(
                "RobomimicStyleObsEncoder: shape_meta['obs'] is empty; list at least one obs key"
            )
        if crop_shape is not None and len(crop_shape) != 2:
            raise ValueError(
                f"RobomimicStyleObsEncoder: crop_shape={crop_shape} must be [height, width] or null"
            )
        self.obs_shapes: dict[str, tuple[int, ...]] = {}
        self.rgb_keys: list[str] = []
        self.low_dim_keys: list[str] = []
        self.obs_nets = nn.ModuleDict()
        self.obs_randomizers = nn.ModuleDict()
        self.activation = nn.ReLU()
        output_dim = 0
        for key, (shape, obs_type) in parse_obs_meta(obs_shape_meta).items():
            self.obs_shapes[key] = shape
            if obs_type == "rgb":
                randomizer = None
                net_input = shape
                if crop_shape is not None:
                    randomizer = CropRandomizer(
                        shape, int(crop_shape[0]), int(crop_shape[1]), fixed_crop_in_eval=eval_fixed_crop
                    )
                    net_input = randomizer.output_shape()
                self.rgb_keys.append(key)
                self.obs_randomizers[key] = randomizer
                self.obs_nets[key] = VisualCore(
                    net_input, feature_dim, num_keypoints, use_group_norm, backbone_width
                )
                output_dim += feature_dim
            else:
                self.low_dim_keys.append(key)
                self.obs_randomizers[key] = None
                self.obs_nets[key] = None
                output_dim += int(torch.Size(shape).numel())
        self.output_dim = output_dim

    def output_shape(self) -> tuple[int]:
        return (self.output_dim,)

    def forward(self, obs_dict: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """obs_dict[key]: (N, *shape) (rgb in [-1, 1]) -> (N, output_dim)."""
        feats = []
        for key, shape in self.obs_shapes.items():
            if key not in obs_dict:
                raise KeyError(
                    f"observation '{key}' from shape_meta is missing (got keys {sorted(obs_dict)})"
                )
            x = obs_dict[key]
            if tuple(x.shape[1:]) != shape:
                raise ValueError(
                    f"observation '{key}' has shape {tuple(x.shape[1:])} per sample, shape_meta says {shape}"
                )
            randomizer = self.obs_randomizers[key]
            if randomizer is not None:
                x = randomizer(x)
            net = self.obs_nets[key]
            if net is not None:
                x = self.activation(net(x))
            feats.append(x.flatten(1))
        return torch.cat(feats, dim=-1)
