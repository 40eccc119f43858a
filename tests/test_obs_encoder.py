"""Image observation encoder (ResNet-18 + spatial softmax, no robomimic), crop randomizer, spatial softmax."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffusion_policy.model.vision.crop_randomizer import CropRandomizer
from diffusion_policy.model.vision.robomimic_style_obs_encoder import RobomimicStyleObsEncoder
from diffusion_policy.model.vision.spatial_softmax import SpatialSoftmax

PUSHT_OBS = {"image": {"shape": [3, 96, 96], "type": "rgb"}, "agent_pos": {"shape": [2], "type": "low_dim"}}


@pytest.fixture(scope="module")
def encoder() -> RobomimicStyleObsEncoder:
    torch.manual_seed(0)
    return RobomimicStyleObsEncoder(PUSHT_OBS, crop_shape=(84, 84), use_group_norm=True, eval_fixed_crop=True)


def test_pusht_feature_size_and_structure(encoder):
    assert encoder.output_dim == 66 and encoder.output_shape() == (66,)
    core = encoder.obs_nets["image"]
    assert sum(p.numel() for p in core.backbone.parameters()) == 11_176_512
    assert sum(p.numel() for p in core.parameters()) == 11_176_512 + 16_416 + 4_160
    assert core.pool.input_shape == (512, 3, 3)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in encoder.modules())
    norms = [m for m in encoder.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.num_groups == m.num_channels // 16 for m in norms)
    assert {m.num_groups for m in norms} == {4, 8, 16, 32}


def test_forward_shapes_relu_and_raw_low_dim(encoder):
    encoder.eval()
    images = torch.rand(6, 3, 96, 96) * 2 - 1
    agent_pos = torch.randn(6, 2)
    with torch.no_grad():
        feats = encoder({"image": images, "agent_pos": agent_pos, "unused": torch.zeros(6)})
        again = encoder({"image": images, "agent_pos": agent_pos})
    assert feats.shape == (6, 66)
    assert (feats[:, :64] >= 0).all()  # ReLU after the linear layer
    torch.testing.assert_close(feats[:, 64:], agent_pos)  # shape_meta order: image first, then agent_pos
    torch.testing.assert_close(feats, again)  # eval: fixed center crop


def test_train_mode_crops_randomly(encoder):
    encoder.train()
    images = torch.rand(1, 3, 96, 96).expand(4, -1, -1, -1)
    with torch.no_grad():
        feats = encoder({"image": images, "agent_pos": torch.zeros(4, 2)})
    # the same image cropped at (most likely) different places gives different features
    assert not torch.allclose(feats[0], feats[1:].mean(0))
    encoder.eval()


def test_encoder_errors():
    with pytest.raises(ValueError, match=r"crop \(100, 84\) does not fit image \(96, 96\)"):
        RobomimicStyleObsEncoder(PUSHT_OBS, crop_shape=(100, 84))
    with pytest.raises(ValueError, match="type 'depth'"):
        RobomimicStyleObsEncoder({"image": {"shape": [1, 8, 8], "type": "depth"}})
    enc = RobomimicStyleObsEncoder({"agent_pos": {"shape": [2]}})
    assert enc.output_dim == 2
    with pytest.raises(KeyError, match="agent_pos"):
        enc({"pos": torch.zeros(1, 2)})
    with pytest.raises(ValueError, match=r"shape \(3,\) per sample"):
        enc({"agent_pos": torch.zeros(1, 3)})


def test_crop_randomizer_offsets_and_center_crop():
    crop = CropRandomizer((1, 12, 12), 8, 8)
    # encode each pixel's position in its value so the crop offset can be read back
    grid = (torch.arange(12)[:, None] * 100 + torch.arange(12)[None, :]).float()
    x = grid.expand(2000, 1, 12, 12)
    out = crop(x)
    assert out.shape == (2000, 1, 8, 8)
    top, left = out[:, 0, 0, 0] // 100, out[:, 0, 0, 0] % 100
    assert set(top.long().tolist()) == set(range(5)) and set(left.long().tolist()) == set(range(5))
    # each crop is a contiguous window
    torch.testing.assert_close(
        out[:, 0], torch.stack([grid[t : t + 8, l : l + 8] for t, l in zip(top.long(), left.long())])
    )
    crop.eval()
    torch.testing.assert_close(crop(x[:3]), x[:3, :, 2:10, 2:10])
    robomimic_like = CropRandomizer((1, 12, 12), 8, 8, fixed_crop_in_eval=False).eval()
    assert len(set(robomimic_like(x[:200])[:, 0, 0, 0].tolist())) > 1


def test_spatial_softmax_finds_the_peak():
    ss = SpatialSoftmax((1, 3, 5), num_kp=1)
    with torch.no_grad():
        ss.nets.weight.fill_(1.0)
        ss.nets.bias.zero_()
    feature = torch.zeros(2, 1, 3, 5)
    feature[0, 0, 0, 4] = 50.0  # top-right pixel -> (x, y) = (1, -1)
    feature[1, 0, 1, 2] = 50.0  # center -> (0, 0)
    kp = ss(feature)
    assert kp.shape == (2, 1, 2)
    torch.testing.assert_close(kp[:, 0], torch.tensor([[1.0, -1.0], [0.0, 0.0]]), atol=1e-4, rtol=0)
