"""The ResNet width option (not in the original): narrower trunks for CPU recipes, default unchanged."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from diffusion_policy.model.vision.model_getter import get_resnet, narrow_resnet
from diffusion_policy.model.vision.multi_image_obs_encoder import MultiImageObsEncoder
from diffusion_policy.model.vision.robomimic_style_obs_encoder import RobomimicStyleObsEncoder

PUSHT_OBS = {"image": {"shape": [3, 96, 96], "type": "rgb"}, "agent_pos": {"shape": [2], "type": "low_dim"}}


def _conv_widths(model: nn.Module) -> list[int]:
    return [model.conv1.out_channels] + [
        getattr(model, f"layer{i}")[-1].conv2.out_channels for i in (1, 2, 3, 4)
    ]


def test_width_64_or_none_is_torchvisions_resnet18():
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None)
    for width in (None, 64):
        torch.manual_seed(0)
        model = get_resnet("resnet18", width=width)
        state = model.state_dict()
        # same init draws, same keys and values: the default path did not change
        assert set(state) == set(reference.state_dict()) - {"fc.weight", "fc.bias"}
        for key, value in state.items():
            torch.testing.assert_close(value, reference.state_dict()[key], rtol=0, atol=0)


def test_narrow_resnet_structure_and_features():
    model = get_resnet("resnet18", width=32)
    assert _conv_widths(model) == [32, 32, 64, 128, 256]
    assert isinstance(model.fc, nn.Identity)
    with torch.no_grad():
        assert model(torch.zeros(3, 3, 76, 76)).shape == (3, 256)
    wide = sum(p.numel() for p in get_resnet("resnet18").parameters())
    narrow = sum(p.numel() for p in model.parameters())
    assert 0.24 < narrow / wide < 0.26  # conv weights scale with width ** 2
    # torchvision's key names, so the checkpoint layout reads like a ResNet-18's
    assert set(model.state_dict()) == set(get_resnet("resnet18").state_dict())
    assert _conv_widths(narrow_resnet("resnet34", 16)) == [16, 16, 32, 64, 128]
    assert len(narrow_resnet("resnet34", 16).layer3) == 6


def test_width_errors():
    with pytest.raises(ValueError, match="no pretrained weights"):
        get_resnet("resnet18", weights="IMAGENET1K_V1", width=32)
    with pytest.raises(ValueError, match="only .* can be narrowed"):
        get_resnet("resnet50", width=32)
    with pytest.raises(ValueError, match="positive integer"):
        narrow_resnet("resnet18", 0)


def test_hybrid_encoder_backbone_width():
    torch.manual_seed(0)
    enc = RobomimicStyleObsEncoder(PUSHT_OBS, crop_shape=(76, 76), use_group_norm=True, backbone_width=32)
    assert enc.output_shape() == (66,)  # feature size per frame does not depend on the trunk's width
    core = enc.obs_nets["image"]
    assert core.pool.input_shape == (256, 3, 3)
    assert {m.num_groups for m in enc.modules() if isinstance(m, nn.GroupNorm)} == {2, 4, 8, 16}
    enc.eval()
    with torch.no_grad():
        out = enc({"image": torch.rand(2, 3, 96, 96) * 2 - 1, "agent_pos": torch.zeros(2, 2)})
    assert out.shape == (2, 66)


def test_multi_image_encoder_with_narrow_resnet():
    enc = MultiImageObsEncoder(
        {"obs": PUSHT_OBS},
        rgb_model=get_resnet("resnet18", width=16),
        crop_shape=(76, 76),
        use_group_norm=True,
    )
    assert enc.output_shape() == (8 * 16 + 2,)
    assert all(m.num_groups == m.num_channels // 16 for m in enc.modules() if isinstance(m, nn.GroupNorm))
