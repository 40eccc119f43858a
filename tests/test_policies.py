"""The two UNet diffusion policies on real PushT batches: shapes, overfitting, scheduler swap, the online
select_action loop, checkpoint round trip and construction-time errors. Networks are tiny (CPU budget)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion_policy.model.diffusion.conditional_unet1d import ConditionalUnet1D
from diffusion_policy.policy.diffusion_unet_hybrid_image_policy import DiffusionUnetHybridImagePolicy
from diffusion_policy.policy.diffusion_unet_lowdim_policy import DiffusionUnetLowdimPolicy
from diffusion_policy.policy.samplers import sampler_label, use_sampler
from tests.policy_helpers import (
    HORIZON,
    SHAPE_META,
    TA,
    TO,
    assert_image_policy_learns,
    assert_training_lowers_loss,
    count_model_calls,
    ddim,
    ddpm,
    real_batch,
    seeded_policy,
)

NORMALIZER_MSG = r"call set_normalizer\(dataset.get_normalizer\(\)\) first"


def lowdim_policy(mode: str = "global", scheduler=None, num_inference_steps: int = 4, **kwargs):
    obs_dim, action_dim = 20, 2
    model = ConditionalUnet1D(
        input_dim=action_dim if mode != "inpaint" else action_dim + obs_dim,
        local_cond_dim=obs_dim if mode == "local" else None,
        global_cond_dim=obs_dim * TO if mode == "global" else None,
        diffusion_step_embed_dim=32,
        down_dims=[32, 64],
        kernel_size=5,
        n_groups=8,
        cond_predict_scale=True,
    )
    return DiffusionUnetLowdimPolicy(
        model=model,
        noise_scheduler=scheduler if scheduler is not None else ddpm(),
        horizon=HORIZON,
        obs_dim=obs_dim,
        action_dim=action_dim,
        n_action_steps=TA,
        n_obs_steps=TO,
        num_inference_steps=num_inference_steps,
        obs_as_local_cond=mode == "local",
        obs_as_global_cond=mode == "global",
        oa_step_convention=True,
        **kwargs,
    )


def image_policy(scheduler=None, num_inference_steps: int = 4, **overrides):
    kwargs = {
        "shape_meta": SHAPE_META,
        "noise_scheduler": scheduler if scheduler is not None else ddpm(),
        "horizon": HORIZON,
        "n_action_steps": TA,
        "n_obs_steps": TO,
        "num_inference_steps": num_inference_steps,
        "obs_as_global_cond": True,
        "crop_shape": [84, 84],
        "diffusion_step_embed_dim": 32,
        "down_dims": [32, 64],
        "kernel_size": 5,
        "n_groups": 8,
        "cond_predict_scale": True,
        "obs_encoder_group_norm": True,
        "eval_fixed_crop": True,
    }
    kwargs.update(overrides)
    return DiffusionUnetHybridImagePolicy(**kwargs)


# ---------------- predict_action on real batches ----------------
@pytest.mark.needs_data
@pytest.mark.parametrize("mode", ["global", "local", "inpaint"])
def test_lowdim_predict_action_shapes(lowdim_data, mode):
    dataset, normalizer = lowdim_data
    policy = seeded_policy(lowdim_policy, normalizer, mode).eval()
    batch = real_batch(dataset, [0, 500, 5000])
    result = policy.predict_action({"obs": batch["obs"][:, :TO]})
    assert result["action"].shape == (3, TA, 2)
    assert result["action_pred"].shape == (3, HORIZON, 2)
    torch.testing.assert_close(result["action"], result["action_pred"][:, TO - 1 : TO - 1 + TA])
    # clip_sample keeps normalized samples in [-1, 1], i.e. inside the demonstrations' action range (12..511)
    assert result["action_pred"].min() >= 12 - 1e-3 and result["action_pred"].max() <= 511 + 1e-3
    if mode == "inpaint":
        assert result["obs_pred"].shape == (3, HORIZON, 20)
        # the given observations are held fixed while denoising
        torch.testing.assert_close(result["obs_pred"][:, :TO], batch["obs"][:, :TO], atol=1e-3, rtol=1e-4)


@pytest.mark.needs_data
def test_image_predict_action_shapes_and_generator(image_data):
    dataset, normalizer = image_data
    policy = seeded_policy(
        image_policy,
        normalizer,
    ).eval()
    batch = real_batch(dataset, [0, 40, 120])
    obs = {k: v[:, :TO] for k, v in batch["obs"].items()}
    assert obs["image"].shape == (3, TO, 3, 96, 96)
    result = policy.predict_action(obs, generator=torch.Generator().manual_seed(1))
    assert result["action"].shape == (3, TA, 2) and result["action_pred"].shape == (3, HORIZON, 2)
    torch.testing.assert_close(result["action"], result["action_pred"][:, TO - 1 : TO - 1 + TA])
    same = policy.predict_action(obs, generator=torch.Generator().manual_seed(1))
    other = policy.predict_action(obs, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(same["action_pred"], result["action_pred"])
    assert not torch.allclose(other["action_pred"], result["action_pred"])


# ---------------- training signal ----------------
@pytest.mark.needs_data
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_lowdim_loss_goes_down_on_real_batches(lowdim_data, prediction_type):
    dataset, normalizer = lowdim_data
    policy = seeded_policy(lowdim_policy, normalizer, "global", scheduler=ddpm(prediction_type))
    batches = [real_batch(dataset, range(start, start + 32)) for start in (0, 3000, 7000)]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    assert_training_lowers_loss(policy, batches, optimizer, 25, 0.6, f"lowdim {prediction_type}")


@pytest.mark.needs_data
def test_image_loss_goes_down_on_real_batches(image_data):
    dataset, normalizer = image_data
    assert_image_policy_learns(seeded_policy(image_policy, normalizer), dataset, "image")


# ---------------- scheduler swap ----------------
@pytest.mark.needs_data
def test_ddpm_and_ddim_swap_by_passing_a_scheduler(lowdim_data):
    dataset, normalizer = lowdim_data
    trained = seeded_policy(
        lowdim_policy, normalizer, "global", scheduler=ddpm(), num_inference_steps=None
    )  # defaults to 100 steps
    obs = {"obs": real_batch(dataset, [10, 20])["obs"][:, :TO]}

    variants = {
        "ddpm-100": trained,
        "ddpm-10": lowdim_policy("global", scheduler=ddpm(), num_inference_steps=10),
        "ddim-8": lowdim_policy("global", scheduler=ddim(), num_inference_steps=8),
        "ddim-8-eta": lowdim_policy("global", scheduler=ddim(), num_inference_steps=8, eta=1.0),
    }
    expected_calls = {"ddpm-100": 100, "ddpm-10": 10, "ddim-8": 8, "ddim-8-eta": 8}
    results = {}
    for name, policy in variants.items():
        # the scheduler is not part of the state: a DDPM-trained checkpoint loads into a DDIM policy
        policy.load_state_dict(trained.state_dict())
        policy.eval()
        calls = count_model_calls(policy)
        results[name] = policy.predict_action(obs, generator=torch.Generator().manual_seed(0))["action"]
        assert len(calls) == expected_calls[name], name
        assert results[name].shape == (2, TA, 2)
    # DDIM with eta=0 is deterministic given the initial noise; eta (forwarded to step()) adds noise
    again = variants["ddim-8"].predict_action(obs, generator=torch.Generator().manual_seed(0))["action"]
    torch.testing.assert_close(again, results["ddim-8"])
    assert not torch.allclose(results["ddim-8-eta"], results["ddim-8"])
    assert not torch.allclose(results["ddpm-10"], results["ddim-8"])


@pytest.mark.needs_data
def test_use_sampler_swaps_a_built_policy_in_place(lowdim_data):
    dataset, normalizer = lowdim_data
    policy = seeded_policy(
        lowdim_policy, normalizer, "global", scheduler=ddim(), num_inference_steps=8, eta=1.0
    )
    policy.eval()
    obs = {"obs": real_batch(dataset, [10, 20])["obs"][:, :TO]}
    reference = lowdim_policy("global", scheduler=ddpm(), num_inference_steps=None)
    reference.load_state_dict(policy.state_dict())
    reference.eval()
    calls = count_model_calls(policy)

    # DDIM -> DDPM: every training timestep, same trained schedule, DDIM's eta dropped
    assert use_sampler(policy, "ddpm") == "DDPMScheduler-100"
    assert policy.kwargs == {} and policy.noise_scheduler.config.beta_schedule == "squaredcos_cap_v2"
    swapped = policy.predict_action(obs, generator=torch.Generator().manual_seed(0))["action"]
    assert len(calls) == 100
    expected = reference.predict_action(obs, generator=torch.Generator().manual_seed(0))["action"]
    torch.testing.assert_close(swapped, expected)
    # only the step count; then back to DDIM
    assert use_sampler(policy, None, 10) == "DDPMScheduler-10"
    assert use_sampler(policy, "ddim", 16) == "DDIMScheduler-16"
    with pytest.raises(ValueError, match=r"num_inference_steps=500 must be in \[1, num_train_timesteps=100"):
        use_sampler(policy, "ddim", 500)
    with pytest.raises(ValueError, match="sampler='rk4' is not one of"):
        use_sampler(policy, "rk4")
    with pytest.raises(ValueError, match="sampler='euler' is a flow-matching solver"):
        use_sampler(policy, "euler")
    assert sampler_label(policy) == "DDIMScheduler-16", "a refused swap leaves the policy as it was"


# ---------------- online interface ----------------
@pytest.mark.needs_data
def test_lowdim_select_action_loop_replans_every_n_action_steps(lowdim_data):
    dataset, normalizer = lowdim_data
    policy = seeded_policy(lowdim_policy, normalizer, "global").eval()
    episode_obs = dataset[100]["obs"].numpy().astype(np.float64)  # (16, 20) like PushTKeypointsEnv steps

    plans, inputs = [], []
    original = policy.predict_action

    def recording_predict(obs_dict, generator=None):
        inputs.append(obs_dict["obs"].clone())
        plans.append(original(obs_dict, generator=generator))
        return plans[-1]

    policy.predict_action = recording_predict
    policy.reset()
    actions = [policy.select_action(episode_obs[t]) for t in range(12)]
    assert all(a.shape == (2,) for a in actions)
    assert len(plans) == 2  # replans at steps 0 and 8
    obs_t = torch.as_tensor(episode_obs, dtype=torch.float32)
    # after reset the first observation fills the whole history
    torch.testing.assert_close(inputs[0][0], torch.stack([obs_t[0], obs_t[0]]))
    torch.testing.assert_close(inputs[1][0], torch.stack([obs_t[7], obs_t[8]]))
    torch.testing.assert_close(torch.stack(actions[:8]), plans[0]["action"][0])
    torch.testing.assert_close(torch.stack(actions[8:]), plans[1]["action"][0, :4])

    policy.reset()
    batched = policy.select_action({"obs": np.stack([episode_obs[0]] * 3)})
    assert batched.shape == (3, 2) and len(plans) == 3
    with pytest.raises(ValueError, match="batch size 2 after 3"):
        policy.select_action(np.stack([episode_obs[1]] * 2))


@pytest.mark.needs_data
def test_image_select_action_with_env_shaped_observations(image_data):
    dataset, normalizer = image_data
    policy = seeded_policy(image_policy, normalizer, num_inference_steps=2).eval()
    sample = dataset[50]
    frame = sample["obs"]["image"][0].numpy()  # (3, 96, 96) float32 in [0, 1], as PushTImageEnv renders
    calls = count_model_calls(policy)
    policy.reset()
    for t in range(10):
        # PushTImageEnv returns agent_pos as float64
        obs = {"image": frame, "agent_pos": sample["obs"]["agent_pos"][t].numpy().astype(np.float64)}
        action = policy.select_action(obs)
        assert action.shape == (2,)
        assert action.min() >= 12 - 1e-3 and action.max() <= 511 + 1e-3
    assert len(calls) == 2 * 2  # two plans (steps 0 and 8) of 2 denoising steps each
    with pytest.raises(KeyError, match="agent_pos"):
        policy.select_action({"image": frame})


@pytest.mark.needs_data
def test_image_state_dict_round_trip(image_data):
    dataset, normalizer = image_data
    policy = seeded_policy(image_policy, normalizer, num_inference_steps=2).eval()
    obs = {k: v[:, :TO] for k, v in real_batch(dataset, [5])["obs"].items()}
    expected = policy.predict_action(obs, generator=torch.Generator().manual_seed(3))["action"]
    fresh = image_policy(num_inference_steps=2).eval()
    fresh.load_state_dict(policy.state_dict())  # normalizer included: no set_normalizer needed
    torch.testing.assert_close(
        fresh.predict_action(obs, generator=torch.Generator().manual_seed(3))["action"], expected
    )


# ---------------- construction-time errors ----------------
@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"horizon": 18, "down_dims": [32, 64, 128]}, "horizon=18 is not divisible by 4"),
        ({"n_action_steps": 16}, r"n_action_steps=16 is not allowed: an integer <= 15"),
        ({"crop_shape": [100, 100]}, r"crop \(100, 100\) does not fit image \(96, 96\)"),
        (
            {
                "shape_meta": {
                    "obs": {"depth": {"shape": [1, 96, 96], "type": "depth"}},
                    "action": {"shape": [2]},
                }
            },
            "type 'depth'",
        ),
        ({"shape_meta": {"obs": SHAPE_META["obs"], "action": {}}}, "no action shape"),
        ({"noise_scheduler": ddpm("v_prediction")}, "prediction_type='v_prediction'"),
        ({"num_inference_steps": 101}, "num_inference_steps=101"),
        ({"eta": 0.5}, r"unexpected policy arguments \['eta'\].*DDPMScheduler"),
    ],
)
def test_image_policy_construction_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        image_policy(**overrides)


def build_lowdim(model_kwargs=None, **overrides):
    model_args = {
        "input_dim": 2,
        "global_cond_dim": 40,
        "diffusion_step_embed_dim": 32,
        "down_dims": [32, 64],
    }
    model_args.update(model_kwargs or {})
    args = {
        "model": ConditionalUnet1D(**model_args),
        "noise_scheduler": ddpm(),
        "horizon": HORIZON,
        "obs_dim": 20,
        "action_dim": 2,
        "n_action_steps": TA,
        "n_obs_steps": TO,
        "obs_as_global_cond": True,
        "oa_step_convention": True,
    }
    args.update(overrides)
    return DiffusionUnetLowdimPolicy(**args)


@pytest.mark.parametrize(
    ("model_kwargs", "overrides", "match"),
    [
        (None, {"horizon": 17}, "horizon=17 is not divisible by 2"),
        (
            None,
            {"n_action_steps": 10, "n_obs_steps": 8},
            r"n_action_steps=10 is not allowed: an integer <= 9",
        ),
        # without the oa convention actions start at n_obs_steps
        (None, {"n_action_steps": 15, "oa_step_convention": False}, "an integer <= 14"),
        (None, {"noise_scheduler": ddpm("v_prediction")}, "prediction_type='v_prediction'"),
        (None, {"n_obs_steps": 3}, "global_cond_dim=40 does not match"),
        (None, {"obs_as_local_cond": True}, "obs_as_local_cond and obs_as_global_cond are both True"),
        (None, {"obs_as_global_cond": False, "pred_action_steps_only": True}, "pred_action_steps_only"),
        ({"global_cond_dim": None}, {"obs_as_global_cond": False}, "input_dim=2 does not match"),
    ],
)
def test_lowdim_policy_construction_errors(model_kwargs, overrides, match):
    with pytest.raises(ValueError, match=match):
        build_lowdim(model_kwargs, **overrides)


@pytest.mark.needs_data
def test_predict_and_loss_before_set_normalizer_raise(lowdim_data, image_data):
    lowdim = lowdim_policy("global")
    batch = real_batch(lowdim_data[0], [0, 1])
    with pytest.raises(RuntimeError, match=NORMALIZER_MSG):
        lowdim.predict_action({"obs": batch["obs"][:, :TO]})
    with pytest.raises(RuntimeError, match=NORMALIZER_MSG):
        lowdim.compute_loss(batch)
    image = image_policy()
    image_batch = real_batch(image_data[0], [0, 1])
    with pytest.raises(RuntimeError, match=NORMALIZER_MSG):
        image.predict_action({k: v[:, :TO] for k, v in image_batch["obs"].items()})
    with pytest.raises(RuntimeError, match=NORMALIZER_MSG):
        image.compute_loss(image_batch)
