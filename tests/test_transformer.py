"""The transformer denoiser (DP-T) and its two policies: exact parameter counts at the paper configs, the
attention masks, the optimizer groups, and the policies on real PushT batches (tiny networks, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from diffusion_policy.model.diffusion.transformer_for_diffusion import TransformerForDiffusion
from diffusion_policy.policy.diffusion_transformer_hybrid_image_policy import (
    DiffusionTransformerHybridImagePolicy,
)
from diffusion_policy.policy.diffusion_transformer_lowdim_policy import DiffusionTransformerLowdimPolicy
from diffusion_policy.policy.samplers import sampler_label, use_sampler
from tests.helpers import compose_config
from tests.policy_helpers import (
    HORIZON,
    SHAPE_META,
    TA,
    TO,
    assert_training_lowers_loss,
    ddim,
    ddpm,
    n_params,
    pusht_data,
    real_batch,
    seeded_policy,
)

STATE = "train_diffusion_transformer_lowdim_pusht_workspace"
IMAGE = "train_diffusion_transformer_hybrid_workspace"


def tiny_model(**overrides) -> TransformerForDiffusion:
    kwargs = dict(  # noqa: C408
        input_dim=2,
        output_dim=2,
        horizon=HORIZON,
        n_obs_steps=TO,
        cond_dim=20,
        n_layer=2,
        n_head=2,
        n_emb=32,
        p_drop_emb=0.0,
        p_drop_attn=0.0,
        causal_attn=True,
        time_as_cond=True,
        obs_as_cond=True,
        n_cond_layers=0,
    )
    return TransformerForDiffusion(**(kwargs | overrides))


def lowdim_policy(scheduler=None, num_inference_steps: int = 4, obs_as_cond: bool = True, **kwargs):
    model = tiny_model(
        input_dim=2 if obs_as_cond else 22,
        output_dim=2 if obs_as_cond else 22,
        cond_dim=20 if obs_as_cond else 0,
    )
    return DiffusionTransformerLowdimPolicy(
        model=model,
        noise_scheduler=scheduler or ddpm(),
        horizon=HORIZON,
        obs_dim=20,
        action_dim=2,
        n_action_steps=TA,
        n_obs_steps=TO,
        num_inference_steps=num_inference_steps,
        obs_as_cond=obs_as_cond,
        **kwargs,
    )


def image_policy(num_inference_steps: int = 2, **overrides):
    kwargs = dict(  # noqa: C408
        shape_meta=SHAPE_META,
        noise_scheduler=ddpm(),
        horizon=10,
        n_action_steps=TA,
        n_obs_steps=TO,
        num_inference_steps=num_inference_steps,
        crop_shape=(84, 84),
        obs_encoder_group_norm=True,
        eval_fixed_crop=True,
        n_layer=1,
        n_head=2,
        n_emb=16,
        p_drop_attn=0.0,
    )
    return DiffusionTransformerHybridImagePolicy(**(kwargs | overrides))


@pytest.fixture(scope="module")
def image_data_h10(pusht_zarr_path):
    return pusht_data(pusht_zarr_path, image=True, horizon=10)


# ---------------------------------------------------------------- paper configs: exact sizes
def test_parameter_counts_at_the_paper_configs():
    with torch.device("meta"):
        state = instantiate(compose_config(STATE).policy)
        image = instantiate(compose_config(IMAGE).policy)
    assert n_params(state.model) == 8_965_122
    assert n_params(image) == 20_172_450
    assert n_params(image.model) == 8_975_362
    assert image.model.horizon == 10 and image.model.cond_dim == 66 and image.obs_feature_dim == 66
    m = state.model
    assert (m.T, m.T_cond, len(m.decoder.layers), m.decoder.layers[0].norm_first) == (16, 3, 8, True)


def test_state_dict_keys_are_the_originals():
    keys = set(tiny_model().state_dict())
    expected = {
        "_dummy_variable",
        "pos_emb",
        "cond_pos_emb",
        "mask",
        "memory_mask",
        "input_emb.weight",
        "cond_obs_emb.weight",
        "encoder.0.weight",
        "encoder.2.bias",
        "decoder.layers.0.self_attn.in_proj_weight",
        "decoder.layers.0.multihead_attn.out_proj.weight",
        "decoder.layers.1.linear2.bias",
        "decoder.layers.1.norm3.weight",
        "ln_f.weight",
        "head.bias",
    }
    assert expected <= keys, expected - keys
    encoder_cond = tiny_model(n_cond_layers=1).state_dict()
    assert "encoder.layers.0.self_attn.in_proj_weight" in encoder_cond


def test_initialisation_follows_the_original():
    torch.manual_seed(0)
    m = tiny_model(n_emb=256, n_head=4)
    assert abs(m.input_emb.weight.std().item() - 0.02) < 0.004
    assert m.input_emb.bias.abs().max() == 0
    attn = m.decoder.layers[0].self_attn
    assert abs(attn.in_proj_weight.std().item() - 0.02) < 0.002 and attn.in_proj_bias.abs().max() == 0
    assert torch.all(m.ln_f.weight == 1) and torch.all(m.ln_f.bias == 0)
    assert abs(m.pos_emb.std().item() - 0.02) < 0.004 and abs(m.cond_pos_emb.std().item() - 0.02) < 0.01


# ---------------------------------------------------------------- masks
def test_masks_match_the_originals_rule():
    m = tiny_model()
    allowed = m.mask == 0
    assert torch.equal(allowed, torch.tril(torch.ones(HORIZON, HORIZON, dtype=torch.bool)))
    memory_allowed = m.memory_mask == 0  # (T, 1 + To): time token, obs t-1, obs t
    t = torch.arange(HORIZON)[:, None]
    s = torch.arange(1 + TO)[None, :]
    assert torch.equal(memory_allowed, t >= s - 1)
    assert memory_allowed[:, 0].all() and memory_allowed[0].tolist() == [True, True, False]


def test_causal_masks_hide_future_actions_and_future_observations():
    torch.manual_seed(0)
    m = tiny_model().eval()
    sample = torch.randn(2, HORIZON, 2)
    cond = torch.randn(2, TO, 20)
    t = torch.tensor(37)
    base = m(sample, t, cond)

    # a future action token (index 9) must not change outputs 0..8, and must change some later one
    later = sample.clone()
    later[:, 9] += 5.0
    out = m(later, t, cond)
    torch.testing.assert_close(out[:, :9], base[:, :9], atol=1e-6, rtol=0)
    assert not torch.allclose(out[:, 9:], base[:, 9:])

    # the newest observation token (obs index 1, memory token 2) is visible from action token 1 on only
    newer = cond.clone()
    newer[:, 1] += 5.0
    out = m(sample, t, newer)
    torch.testing.assert_close(out[:, :1], base[:, :1], atol=1e-6, rtol=0)
    assert not torch.allclose(out[:, 1:], base[:, 1:])

    # without causal_attn the same change reaches the first token
    free = tiny_model(causal_attn=False).eval()
    assert free.mask is None and free.memory_mask is None
    assert not torch.allclose(free(sample, t, newer)[:, :1], free(sample, t, cond)[:, :1])


def test_encoder_only_variant_without_time_condition():
    m = tiny_model(time_as_cond=False, cond_dim=0, obs_as_cond=False).eval()
    assert m.encoder_only and m.decoder is None and m.T == HORIZON + 1 and m.memory_mask is None
    out = m(torch.randn(3, HORIZON, 2), 5)
    assert out.shape == (3, HORIZON, 2)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"n_emb": 30, "n_head": 4}, "n_emb=30 must be divisible by n_head=4"),
        ({"time_as_cond": False}, "needs time_as_cond=True"),
        ({"horizon": 0}, "horizon=0 must be >= 1"),
    ],
)
def test_construction_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_model(**overrides)


# ---------------------------------------------------------------- optimizer groups
def _group_names(module: nn.Module, groups: list[dict]) -> list[set[str]]:
    names = {id(p): n for n, p in module.named_parameters()}
    return [{names[id(p)] for p in g["params"]} for g in groups]


def test_optimizer_groups_cover_every_parameter_once():
    m = tiny_model(n_cond_layers=1)
    decay, no_decay = _group_names(m, m.get_optim_groups(weight_decay=0.1))
    all_names = {n for n, _ in m.named_parameters()}
    assert decay | no_decay == all_names and not decay & no_decay
    assert {"pos_emb", "cond_pos_emb", "_dummy_variable"} <= no_decay
    no_decay_kinds = ("bias", "norm", "ln_f", "pos_emb", "_dummy")
    assert all(any(kind in n for kind in no_decay_kinds) for n in no_decay), no_decay
    assert all(n.endswith("weight") and "norm" not in n and "ln_f" not in n for n in decay)
    assert "decoder.layers.0.self_attn.in_proj_weight" in decay and "ln_f.weight" in no_decay
    assert "encoder.layers.0.norm1.weight" in no_decay and "head.weight" in decay


def test_policy_optimizers_have_the_original_groups():
    state = lowdim_policy()
    opt = state.get_optimizer(weight_decay=0.1, learning_rate=3e-4, betas=[0.9, 0.95])
    assert isinstance(opt, torch.optim.AdamW) and [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.defaults["lr"] == 3e-4 and opt.defaults["betas"] == (0.9, 0.95)
    in_groups = [p for g in opt.param_groups for p in g["params"]]
    assert len(in_groups) == len({id(p) for p in in_groups}) == len(list(state.model.parameters()))

    image = image_policy()
    opt = image.get_optimizer(
        transformer_weight_decay=1e-3, obs_encoder_weight_decay=1e-6, learning_rate=1e-4, betas=(0.9, 0.95)
    )
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-3, 0.0, 1e-6]
    in_groups = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(in_groups) == len(set(in_groups))
    trainable = {id(p) for p in image.model.parameters()} | {id(p) for p in image.obs_encoder.parameters()}
    assert set(in_groups) == trainable
    norm_params = {
        id(p)
        for mod in image.obs_encoder.modules()
        if isinstance(mod, nn.GroupNorm)
        for p in mod.parameters()
    }
    assert norm_params <= {id(p) for p in opt.param_groups[2]["params"]}


# ---------------------------------------------------------------- policies on real data
@pytest.mark.needs_data
@pytest.mark.parametrize("obs_as_cond", [True, False], ids=["cond", "inpaint"])
def test_lowdim_predict_action_shapes(lowdim_data, obs_as_cond):
    dataset, normalizer = lowdim_data
    policy = seeded_policy(lowdim_policy, normalizer, obs_as_cond=obs_as_cond).eval()
    batch = real_batch(dataset, [0, 500, 5000])
    result = policy.predict_action({"obs": batch["obs"][:, :TO]}, generator=torch.Generator().manual_seed(1))
    assert result["action"].shape == (3, TA, 2) and result["action_pred"].shape == (3, HORIZON, 2)
    torch.testing.assert_close(result["action"], result["action_pred"][:, TO - 1 : TO - 1 + TA])
    assert result["action_pred"].min() >= 12 - 1e-3 and result["action_pred"].max() <= 511 + 1e-3
    again = policy.predict_action({"obs": batch["obs"][:, :TO]}, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(again["action_pred"], result["action_pred"])
    if not obs_as_cond:
        torch.testing.assert_close(result["obs_pred"][:, :TO], batch["obs"][:, :TO], atol=1e-3, rtol=1e-4)


@pytest.mark.needs_data
def test_lowdim_pred_action_steps_only(lowdim_data):
    dataset, normalizer = lowdim_data
    model = tiny_model(horizon=TA)
    policy = DiffusionTransformerLowdimPolicy(
        model,
        ddpm(),
        HORIZON,
        20,
        2,
        TA,
        TO,
        num_inference_steps=2,
        obs_as_cond=True,
        pred_action_steps_only=True,
    )
    policy.set_normalizer(normalizer)
    batch = real_batch(dataset, [3, 4])
    assert policy.predict_action({"obs": batch["obs"]})["action"].shape == (2, TA, 2)
    assert torch.isfinite(policy.compute_loss(batch))
    with pytest.raises(ValueError, match="model horizon=16 does not match"):
        DiffusionTransformerLowdimPolicy(
            tiny_model(), ddpm(), HORIZON, 20, 2, TA, TO, obs_as_cond=True, pred_action_steps_only=True
        )


@pytest.mark.needs_data
def test_lowdim_loss_goes_down_and_ddim_swap(lowdim_data):
    dataset, normalizer = lowdim_data
    policy = seeded_policy(lowdim_policy, normalizer, num_inference_steps=None)
    batches = [real_batch(dataset, range(start, start + 32)) for start in (0, 3000, 7000)]
    optimizer = policy.get_optimizer(weight_decay=1e-3, learning_rate=1e-3, betas=(0.9, 0.95))
    assert_training_lowers_loss(policy, batches, optimizer, 30, 0.6, "DP-T lowdim")

    policy.eval()
    assert sampler_label(policy) == "DDPMScheduler-100"
    assert use_sampler(policy, "ddim", 8) == "DDIMScheduler-8"
    obs = {"obs": batches[0]["obs"][:4, :TO]}
    assert policy.predict_action(obs)["action"].shape == (4, TA, 2)
    # DDIM with eta 0 is deterministic: the same initial noise gives the same actions
    a = policy.predict_action(obs, generator=torch.Generator().manual_seed(3))["action"]
    b = policy.predict_action(obs, generator=torch.Generator().manual_seed(3))["action"]
    torch.testing.assert_close(a, b)


@pytest.mark.needs_data
def test_lowdim_select_action_replans_every_n_action_steps(lowdim_data):
    dataset, normalizer = lowdim_data
    policy = seeded_policy(lowdim_policy, normalizer, scheduler=ddim(), num_inference_steps=2).eval()
    episode_obs = dataset[100]["obs"].numpy().astype(np.float64)
    calls = []
    policy.model.register_forward_hook(lambda *_: calls.append(1))
    policy.reset()
    actions = [policy.select_action(episode_obs[t]) for t in range(10)]
    assert all(a.shape == (2,) for a in actions) and len(calls) == 2 * 2
    policy.reset()
    assert policy.select_action({"obs": np.stack([episode_obs[0]] * 3)}).shape == (3, 2)


@pytest.mark.needs_data
def test_image_policy_predicts_trains_and_steps_online(image_data_h10):
    dataset, normalizer = image_data_h10
    policy = seeded_policy(image_policy, normalizer)
    batches = [real_batch(dataset, [0, 29, 58, 87]), real_batch(dataset, [100, 125, 150, 175])]
    assert batches[0]["obs"]["image"].shape == (4, TO, 3, 96, 96)  # only the encoded frames are loaded
    optimizer = policy.get_optimizer(
        transformer_weight_decay=1e-3, obs_encoder_weight_decay=1e-6, learning_rate=2e-3, betas=(0.9, 0.95)
    )

    def reach_encoder():
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.obs_encoder.parameters())

    assert_training_lowers_loss(policy, batches, optimizer, 12, 0.85, "DP-T image", reach_encoder)

    policy.eval()
    obs = {k: v[:, :TO] for k, v in batches[0]["obs"].items()}
    result = policy.predict_action(obs)
    assert result["action"].shape == (4, TA, 2) and result["action_pred"].shape == (4, 10, 2)

    sample = dataset[50]
    frame = sample["obs"]["image"][0].numpy()
    policy.reset()
    for _ in range(9):
        action = policy.select_action({"image": frame, "agent_pos": sample["obs"]["agent_pos"][0].numpy()})
        assert action.shape == (2,)
    with pytest.raises(KeyError, match="agent_pos"):
        policy.select_action({"image": frame})


def test_policy_construction_errors():
    with pytest.raises(ValueError, match="model input_dim=2 does not match"):
        DiffusionTransformerLowdimPolicy(tiny_model(), ddpm(), HORIZON, 20, 2, TA, TO, obs_as_cond=False)
    with pytest.raises(ValueError, match="n_action_steps=16 is not allowed"):
        DiffusionTransformerLowdimPolicy(tiny_model(), ddpm(), HORIZON, 20, 2, 16, TO, obs_as_cond=True)
    with pytest.raises(ValueError, match="pred_action_steps_only=True needs obs_as_cond=True"):
        image_policy(obs_as_cond=False, pred_action_steps_only=True)
    with pytest.raises(ValueError, match="shape_meta has no action shape"):
        image_policy(shape_meta={"obs": SHAPE_META["obs"]})
    with pytest.raises(RuntimeError, match=r"set_normalizer"):
        lowdim_policy().predict_action({"obs": torch.zeros(1, TO, 20)})
