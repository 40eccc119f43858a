"""ConditionalUnet1D: shapes, conditioning paths, checkpoint key layout, divisibility check and the
original's parameter counts (lowdim UNet, image UNet and the full hybrid policy)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from diffusion_policy.model.diffusion.conditional_unet1d import ConditionalUnet1D
from diffusion_policy.model.diffusion.conv1d_components import (
    TemporalConv1d,
    conv1d_as_matmul,
    set_conv_matmul,
)
from diffusion_policy.model.diffusion.positional_embedding import SinusoidalPosEmb
from diffusion_policy.policy.diffusion_unet_hybrid_image_policy import DiffusionUnetHybridImagePolicy
from tests.policy_helpers import SHAPE_META as PUSHT_IMAGE_SHAPE_META
from tests.policy_helpers import n_params


def tiny_unet(**kwargs) -> ConditionalUnet1D:
    args = {
        "input_dim": 2,
        "diffusion_step_embed_dim": 16,
        "down_dims": [16, 32, 64],
        "kernel_size": 5,
        "n_groups": 8,
    }
    args.update(kwargs)
    return ConditionalUnet1D(**args)


def test_parameter_counts_match_the_original():
    # meta tensors: exact shapes and counts without allocating/initialising ~330M floats on CPU
    with torch.device("meta"):
        lowdim = ConditionalUnet1D(
            input_dim=2,
            global_cond_dim=40,
            diffusion_step_embed_dim=256,
            down_dims=[256, 512, 1024],
            kernel_size=5,
            n_groups=8,
            cond_predict_scale=True,
        )
        hybrid = DiffusionUnetHybridImagePolicy(
            shape_meta=PUSHT_IMAGE_SHAPE_META,
            noise_scheduler=DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2"),
            horizon=16,
            n_action_steps=8,
            n_obs_steps=2,
            num_inference_steps=100,
            obs_as_global_cond=True,
            crop_shape=[84, 84],
            diffusion_step_embed_dim=128,
            down_dims=[512, 1024, 2048],
            kernel_size=5,
            n_groups=8,
            cond_predict_scale=True,
            obs_encoder_group_norm=True,
            eval_fixed_crop=True,
        )
    assert n_params(lowdim) == 65_783_298
    assert hybrid.model.global_cond_dim == 132
    assert n_params(hybrid.model) == 251_511_938
    assert n_params(hybrid.obs_encoder) == 11_197_088
    assert n_params(hybrid, trainable_only=True) == 262_709_026


def test_sinusoidal_embedding_formula():
    emb = SinusoidalPosEmb(8)(torch.tensor([0, 3]))
    assert emb.shape == (2, 8)
    freqs = torch.exp(-math.log(10000) * torch.arange(4) / 3)
    torch.testing.assert_close(emb[1], torch.cat([torch.sin(3 * freqs), torch.cos(3 * freqs)]))
    torch.testing.assert_close(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))


@pytest.mark.parametrize("cond_predict_scale", [True, False])
def test_forward_shapes_and_timestep_forms(cond_predict_scale):
    torch.manual_seed(0)
    net = tiny_unet(global_cond_dim=6, cond_predict_scale=cond_predict_scale).eval()
    x = torch.randn(3, 16, 2)
    cond = torch.randn(3, 6)
    out_int = net(x, 7, global_cond=cond)
    assert out_int.shape == (3, 16, 2)
    torch.testing.assert_close(net(x, torch.tensor(7), global_cond=cond), out_int)
    torch.testing.assert_close(net(x, torch.full((3,), 7), global_cond=cond), out_int)
    # the step and the condition both reach the output
    assert not torch.allclose(net(x, 50, global_cond=cond), out_int)
    assert not torch.allclose(net(x, 7, global_cond=cond + 1), out_int)


def test_local_cond_only_first_encoder_is_used():
    torch.manual_seed(0)
    net = tiny_unet(local_cond_dim=3, down_dims=[16, 32]).eval()
    x, local = torch.randn(2, 8, 2), torch.randn(2, 8, 3)
    base = net(x, 3, local_cond=local)
    assert base.shape == (2, 8, 2)
    assert not torch.allclose(net(x, 3, local_cond=local * 2), base)
    # the original never adds the second ("up") local feature; kept only for checkpoint compatibility
    with torch.no_grad():
        for p in net.local_cond_encoder[1].parameters():
            p.add_(1.0)
    torch.testing.assert_close(net(x, 3, local_cond=local), base)


def test_state_dict_keys_follow_the_original_layout():
    keys = set(tiny_unet(global_cond_dim=4, local_cond_dim=3, cond_predict_scale=True).state_dict())
    expected = {
        "diffusion_step_encoder.1.weight",
        "diffusion_step_encoder.3.weight",
        "local_cond_encoder.1.blocks.0.block.0.weight",
        "down_modules.0.0.blocks.0.block.0.weight",
        "down_modules.0.0.blocks.0.block.1.weight",
        "down_modules.0.0.cond_encoder.1.weight",
        "down_modules.0.0.residual_conv.weight",
        "down_modules.1.2.conv.weight",
        "mid_modules.1.blocks.1.block.0.bias",
        "up_modules.0.0.residual_conv.weight",
        "up_modules.1.2.conv.weight",
        "final_conv.0.block.0.weight",
        "final_conv.1.weight",
    }
    assert expected <= keys, expected - keys
    # last down level has no downsampling conv; both up levels upsample
    assert not any(k.startswith("down_modules.2.2.") for k in keys)
    # FiLM: the cond encoder predicts scale and bias (2 * out channels)
    net = tiny_unet(global_cond_dim=4, cond_predict_scale=True)
    assert net.down_modules[0][0].cond_encoder[1].out_features == 2 * 16


def test_horizon_not_divisible_raises():
    net = tiny_unet(global_cond_dim=4)  # 3 levels -> T must be divisible by 4
    assert net.downsample_factor == 4
    with pytest.raises(ValueError, match="sequence length 18 is not divisible by 4"):
        net(torch.randn(1, 18, 2), 0, global_cond=torch.randn(1, 4))
    with pytest.raises(ValueError, match="3 channels, expected 2"):
        net(torch.randn(1, 16, 3), 0, global_cond=torch.randn(1, 4))


def test_construction_errors():
    with pytest.raises(ValueError, match="kernel_size=4"):
        tiny_unet(kernel_size=4)
    with pytest.raises(ValueError, match=r"down_dims \[20\] are not divisible by n_groups=8"):
        tiny_unet(down_dims=[16, 20])


# ----------------------------------------------------------------------------- convs as matrix products
@pytest.mark.parametrize(
    ("stride", "padding", "kernel", "bias"), [(1, 2, 5, True), (2, 1, 3, True), (1, 0, 1, False)]
)
def test_conv_as_matmul_is_the_same_function(stride, padding, kernel, bias):
    torch.manual_seed(0)
    x = torch.randn(3, 6, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6, kernel, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True) if bias else None
    got = conv1d_as_matmul(x, w, b, stride, padding)
    want = torch.nn.functional.conv1d(x, w, b, stride=stride, padding=padding)
    torch.testing.assert_close(got, want)
    inputs = (x, w) + ((b,) if bias else ())
    grad_out = torch.randn_like(want)
    for g_got, g_want in zip(
        torch.autograd.grad(got, inputs, grad_out), torch.autograd.grad(want, inputs, grad_out), strict=True
    ):
        torch.testing.assert_close(g_got, g_want)


def test_unet_trains_wide_convs_as_matmuls_on_cpu_only_and_computes_the_same():
    torch.manual_seed(0)
    # 32 channels x 5 taps = 160 >= the threshold set below: the level-1 and deeper convs take the matmul path
    unet = tiny_unet(down_dims=[16, 32], global_cond_dim=4)
    set_conv_matmul(unet, 160)
    calls = []
    for m in unet.modules():
        if isinstance(m, TemporalConv1d):
            m.register_forward_hook(lambda mod, args, _out: calls.append(mod._uses_matmul(args[0])))
    x, t, cond = torch.randn(2, 16, 2), torch.tensor([3, 7]), torch.randn(2, 4)

    def run(train: bool, grad: bool):
        calls.clear()
        unet.train(train)
        with torch.set_grad_enabled(grad):
            return unet(x, t, global_cond=cond), sum(calls)

    train_out, n_matmul = run(True, True)
    assert n_matmul > 0 and n_matmul < len(calls), "only the wide convs use the matrix product"
    assert run(True, False)[1] == 0 and run(False, True)[1] == 0, "inference and eval mode use the plain conv"
    set_conv_matmul(unet, None)
    plain_out, n_plain = run(True, True)
    assert n_plain == 0
    torch.testing.assert_close(train_out, plain_out, rtol=1e-5, atol=1e-6)
