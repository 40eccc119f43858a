"""The original's pure-torch image recipe: get_resnet, MultiImageObsEncoder, DiffusionUnetImagePolicy and
train_diffusion_unet_image_workspace, from parameter counts at the paper config to a CLI train + eval."""

from __future__ import annotations

import json
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from hydra.utils import instantiate
from torch import nn

from diffusion_policy.common.checkpoint_io import load_checkpoint_file
from diffusion_policy.model.vision.crop_randomizer import CropRandomizer
from diffusion_policy.model.vision.model_getter import get_resnet
from diffusion_policy.model.vision.multi_image_obs_encoder import MultiImageObsEncoder
from diffusion_policy.policy.diffusion_unet_hybrid_image_policy import DiffusionUnetHybridImagePolicy
from diffusion_policy.policy.diffusion_unet_image_policy import DiffusionUnetImagePolicy
from diffusion_policy.policy.samplers import sampler_label, use_sampler
from tests.helpers import (
    assert_ok,
    compose_config,
    evaluate_in_process,
    run_cli,
    train_cli,
)
from tests.policy_helpers import (
    HORIZON,
    SHAPE_META,
    TA,
    TO,
    assert_image_policy_learns,
    count_model_calls,
    ddim,
    ddpm,
    n_params,
    real_batch,
    seeded_policy,
)

IMAGE = "train_diffusion_unet_image_workspace"


def compose_image(overrides: list[str] = ()):
    return compose_config(IMAGE, overrides)


class ChannelMean(nn.Module):
    """Tiny deterministic stand-in backbone: (N, C, H, W) -> (N, C) per-channel means."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


# two cameras and two low-dim keys, deliberately not in sorted order
MULTI_META = {
    "obs": {
        "wrist": {"shape": [3, 8, 8], "type": "rgb"},
        "z_pos": {"shape": [1]},  # type defaults to low_dim
        "agent_view": {"shape": [3, 8, 8], "type": "rgb"},
        "a_pos": {"shape": [2], "type": "low_dim"},
    },
    "action": {"shape": [2]},
}


def multi_obs(n: int = 5) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "wrist": torch.rand(n, 3, 8, 8),
        "z_pos": torch.randn(n, 1),
        "agent_view": torch.rand(n, 3, 8, 8) + 2.0,
        "a_pos": torch.randn(n, 2),
    }


# ---------------- the paper config, counted on the meta device ----------------
def test_paper_config_parameter_counts_on_meta_device():
    cfg = compose_image()
    with torch.device("meta"):
        policy = instantiate(cfg.policy)
    assert isinstance(policy, DiffusionUnetImagePolicy)
    encoder = policy.obs_encoder
    assert isinstance(encoder, MultiImageObsEncoder)
    assert encoder.output_shape() == (514,)  # 512 ResNet-18 features + agent_pos (2)
    assert policy.obs_feature_dim == 514 and policy.model.global_cond_dim == 514 * 2
    assert n_params(encoder) == 11_176_512  # ResNet-18 minus fc; GroupNorm has BatchNorm's parameter count
    assert n_params(policy) == 288_378_562
    assert n_params(policy.model) == 288_378_562 - 11_176_512
    assert not any(isinstance(m, nn.BatchNorm2d) for m in encoder.modules())
    # crop 76 from 96 x 96, then ImageNet normalisation, per rgb key
    resize, crop, norm = encoder.key_transform_map["image"]
    assert isinstance(resize, nn.Identity) and isinstance(crop, CropRandomizer)
    assert (crop.crop_height, crop.crop_width) == (76, 76) and not isinstance(norm, nn.Identity)
    assert list(policy.obs_shapes) == ["image", "agent_pos"]  # shape_meta order, from shape_meta


# ---------------- get_resnet ----------------
def test_get_resnet_random_init_returns_pooled_features():
    torch.manual_seed(0)
    resnet = get_resnet("resnet18")
    assert isinstance(resnet.fc, nn.Identity)
    with torch.no_grad():
        assert resnet.eval()(torch.rand(2, 3, 40, 40)).shape == (2, 512)
    assert n_params(resnet) == 11_176_512


def test_get_resnet_pretrained_weights_offline_is_one_line_error(monkeypatch, tmp_path):
    # an empty hub cache and no network: torch hub's download fails as it does offline
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(ValueError) as info:
        get_resnet("resnet18", weights="IMAGENET1K_V1")
    msg = str(info.value)
    assert "\n" not in msg
    assert "IMAGENET1K_V1" in msg and "weights=null" in msg
    assert "resnet18-f37072fd.pth" in msg and str(tmp_path / "torch_home" / "hub" / "checkpoints") in msg

    for name, weights, needle in [
        ("resnet18", "IMAGENET9K", "unknown weights 'IMAGENET9K'"),
        ("resnet19", None, "unknown model name 'resnet19'"),
        ("vit_b_16", None, "has no 'fc' head"),
    ]:
        with pytest.raises(ValueError, match=needle) as info:
            get_resnet(name, weights=weights)
        assert "\n" not in str(info.value)


# ---------------- MultiImageObsEncoder ----------------
def test_encoder_key_names_group_norm_and_deep_copies():
    rgb_model = get_resnet("resnet18")
    encoder = MultiImageObsEncoder(
        {"obs": SHAPE_META["obs"]}, rgb_model, crop_shape=[76, 76], use_group_norm=True, imagenet_norm=True
    )
    keys = list(encoder.state_dict())
    assert keys[0] == "_dummy_variable"
    assert all(k.startswith("key_model_map.image.") for k in keys[1:])
    assert "key_model_map.image.layer4.1.bn2.weight" in keys
    modules = dict(encoder.named_modules())
    assert {"key_transform_map.image.0", "key_transform_map.image.1", "key_transform_map.image.2"} <= set(
        modules
    )
    norms = [m for m in encoder.modules() if isinstance(m, nn.GroupNorm)]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in encoder.modules())
    assert len(norms) == 20 and all(m.num_groups == m.num_channels // 16 for m in norms)
    assert {m.num_groups for m in norms} == {4, 8, 16, 32}
    # the encoder holds a copy: the model passed in is untouched
    assert encoder.key_model_map["image"] is not rgb_model
    assert any(isinstance(m, nn.BatchNorm2d) for m in rgb_model.modules())


def test_encoder_crop_is_random_in_train_and_center_in_eval():
    torch.manual_seed(0)
    encoder = MultiImageObsEncoder({"obs": SHAPE_META["obs"]}, ChannelMean(), crop_shape=[76, 76])
    transform = encoder.key_transform_map["image"]
    # each pixel's value is its position, so crops at different offsets differ
    grid = (torch.arange(96)[:, None] * 100 + torch.arange(96)[None, :]).float()
    images = grid.expand(64, 3, 96, 96)
    encoder.eval()
    center = transform(images)
    assert center.shape == (64, 3, 76, 76)
    torch.testing.assert_close(center, images[:, :, 10:86, 10:86])
    encoder.train()
    crops = transform(images)
    assert crops.shape == (64, 3, 76, 76)
    assert len({int(c[0, 0, 0]) for c in crops}) > 10  # random offsets
    # random_crop=False: the center crop in both modes (the original meant this but cropped nothing)
    fixed = MultiImageObsEncoder(
        {"obs": SHAPE_META["obs"]}, ChannelMean(), crop_shape=[76, 76], random_crop=False
    )
    for mode in (True, False):
        fixed.train(mode)
        torch.testing.assert_close(fixed.key_transform_map["image"](images), center)
    assert fixed.output_shape() == (3 + 2,)


def test_encoder_resize_and_imagenet_norm_on_top_of_minus_one_one():
    encoder = MultiImageObsEncoder(
        {"obs": {"image": {"shape": [3, 96, 96], "type": "rgb"}}},
        ChannelMean(),
        resize_shape=[48, 48],
        crop_shape=[40, 40],
        imagenet_norm=True,
    ).eval()
    images = torch.rand(2, 3, 96, 96) * 2 - 1  # the policy's normalized range
    resized = torchvision.transforms.functional.resize(images, [48, 48], antialias=True)
    expected = torchvision.transforms.functional.normalize(
        resized[:, :, 4:44, 4:44], [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    )
    torch.testing.assert_close(encoder.key_transform_map["image"](images), expected)
    assert encoder.output_shape() == (3,)


def test_encoder_feature_order_rgb_sorted_then_low_dim_sorted():
    encoder = MultiImageObsEncoder(MULTI_META, ChannelMean())
    assert encoder.rgb_keys == ["agent_view", "wrist"] and encoder.low_dim_keys == ["a_pos", "z_pos"]
    assert sorted(encoder.key_model_map) == ["agent_view", "wrist"]
    obs = multi_obs()
    expected = torch.cat(
        [obs["agent_view"].mean((2, 3)), obs["wrist"].mean((2, 3)), obs["a_pos"], obs["z_pos"]], dim=-1
    )
    torch.testing.assert_close(encoder(obs), expected)
    assert encoder.output_shape() == (3 + 3 + 2 + 1,)
    # a dict of per-key models is used as given
    models = {"agent_view": ChannelMean(), "wrist": nn.Sequential(ChannelMean(), nn.Linear(3, 4))}
    per_key = MultiImageObsEncoder(MULTI_META, models)
    assert per_key.key_model_map["agent_view"] is models["agent_view"] and per_key.output_shape() == (10,)


def test_encoder_shared_model_runs_every_camera_in_one_batch():
    backbone = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), ChannelMean())
    shared = MultiImageObsEncoder(MULTI_META, backbone, share_rgb_model=True, use_group_norm=True).eval()
    assert list(shared.key_model_map) == ["rgb"]
    assert all(k.startswith(("_dummy", "key_model_map.rgb.")) for k in shared.state_dict())
    assert isinstance(shared.key_model_map["rgb"][1], nn.GroupNorm)  # also for the shared model
    batches = []
    shared.key_model_map["rgb"].register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    obs = multi_obs(n=5)
    feats = shared(obs)
    assert batches == [2 * 5]  # both cameras in one call
    assert feats.shape == (5, 16 + 16 + 2 + 1)
    # same features as running the one model on each camera separately, in sorted key order
    model = shared.key_model_map["rgb"]
    with torch.no_grad():
        expected = torch.cat([model(obs["agent_view"]), model(obs["wrist"]), obs["a_pos"], obs["z_pos"]], -1)
    torch.testing.assert_close(feats.detach(), expected)


@pytest.mark.parametrize(
    ("meta", "kwargs", "match"),
    [
        ({"obs": {"depth": {"shape": [1, 8, 8], "type": "depth"}}}, {}, "type 'depth'"),
        ({"obs": {"image": {"type": "rgb"}}}, {}, r"shape_meta\['obs'\]\['image'\] has no 'shape'"),
        ({"obs": {"image": {"shape": [8, 8], "type": "rgb"}}}, {}, r"must be \[C, H, W\]"),
        ({"action": {"shape": [2]}}, {}, r"shape_meta\['obs'\] is missing"),
        (SHAPE_META, {"crop_shape": [100, 100]}, r"crop \(100, 100\) does not fit the \(96, 96\) image"),
        (SHAPE_META, {"crop_shape": [76]}, r"crop_shape=\[76\] for 'image' must be \[height, width\]"),
        (SHAPE_META, {"resize_shape": [48, 48], "crop_shape": [76, 76]}, "no larger than the"),
        (SHAPE_META, {"rgb_model": {"wrist": ChannelMean()}}, "no entry for rgb key 'image'"),
        (SHAPE_META, {"rgb_model": {"image": ChannelMean()}, "share_rgb_model": True}, "not a dict"),
    ],
)
def test_encoder_errors_are_one_line(meta, kwargs, match):
    kwargs = {"rgb_model": ChannelMean(), **kwargs}
    with pytest.raises(ValueError, match=match) as info:
        MultiImageObsEncoder(meta, **kwargs)
    assert "\n" not in str(info.value)
    encoder = MultiImageObsEncoder(MULTI_META, ChannelMean())
    obs = multi_obs()
    with pytest.raises(KeyError, match="'wrist' from shape_meta is missing"):
        encoder({k: v for k, v in obs.items() if k != "wrist"})
    with pytest.raises(ValueError, match=r"'a_pos' has shape \(3,\) per sample"):
        encoder({**obs, "a_pos": torch.zeros(5, 3)})


# ---------------- the policy on real PushT batches (tiny UNet, real ResNet-18) ----------------
def image_encoder(**overrides) -> MultiImageObsEncoder:
    kwargs = {
        "shape_meta": SHAPE_META,
        "rgb_model": get_resnet("resnet18"),
        "crop_shape": [76, 76],
        "random_crop": True,
        "use_group_norm": True,
        "imagenet_norm": True,
    }
    kwargs.update(overrides)
    return MultiImageObsEncoder(**kwargs)


def unet_image_policy(scheduler=None, num_inference_steps: int = 4, encoder=None, **overrides):
    kwargs = {
        "shape_meta": SHAPE_META,
        "noise_scheduler": scheduler if scheduler is not None else ddpm(),
        "obs_encoder": encoder if encoder is not None else image_encoder(),
        "horizon": HORIZON,
        "n_action_steps": TA,
        "n_obs_steps": TO,
        "num_inference_steps": num_inference_steps,
        "diffusion_step_embed_dim": 32,
        "down_dims": [32, 64],
    }
    kwargs.update(overrides)
    return DiffusionUnetImagePolicy(**kwargs)


def test_hybrid_is_the_image_policy_with_its_own_encoder():
    assert issubclass(DiffusionUnetHybridImagePolicy, DiffusionUnetImagePolicy)
    # nothing but __init__ is overridden: one implementation of sampling, loss and the online loop
    assert set(vars(DiffusionUnetHybridImagePolicy)) - {"__init__", "__doc__", "__module__"} <= {
        "__qualname__",
        "__firstlineno__",
        "__static_attributes__",
    }


@pytest.mark.needs_data
def test_predict_action_shapes_and_state_dict_keys(image_data):
    dataset, normalizer = image_data
    policy = seeded_policy(
        unet_image_policy,
        normalizer,
    ).eval()
    keys = list(policy.state_dict())
    assert "obs_encoder.key_model_map.image.conv1.weight" in keys
    assert {k.split(".")[0] for k in keys} == {
        "_dummy_variable",
        "obs_encoder",
        "model",
        "mask_generator",
        "normalizer",
    }
    batch = real_batch(dataset, [0, 40, 120])
    obs = {k: v[:, :TO] for k, v in batch["obs"].items()}
    result = policy.predict_action(obs, generator=torch.Generator().manual_seed(1))
    assert result["action"].shape == (3, TA, 2) and result["action_pred"].shape == (3, HORIZON, 2)
    torch.testing.assert_close(result["action"], result["action_pred"][:, TO - 1 : TO - 1 + TA])
    assert result["action_pred"].min() >= 12 - 1e-3 and result["action_pred"].max() <= 511 + 1e-3
    same = policy.predict_action(obs, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(same["action_pred"], result["action_pred"])  # eval: center crop, same noise
    with pytest.raises(ValueError, match="past_action"):
        policy.predict_action({**obs, "past_action": torch.zeros(3, TO, 2)})


@pytest.mark.needs_data
def test_inpainting_mode_predicts_and_trains(image_data):
    dataset, normalizer = image_data
    policy = seeded_policy(unet_image_policy, normalizer, obs_as_global_cond=False, num_inference_steps=2)
    assert policy.model.global_cond_dim is None
    batch = real_batch(dataset, [0, 40])
    # inpainting encodes all horizon frames; the dataset (n_obs_steps=2) loads only the first 2 images
    batch["obs"]["image"] = batch["obs"]["image"][:, :1].repeat(1, HORIZON, 1, 1, 1)
    loss = policy.compute_loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    result = policy.eval().predict_action({k: v[:, :TO] for k, v in batch["obs"].items()})
    assert result["action"].shape == (2, TA, 2)


@pytest.mark.needs_data
def test_loss_is_finite_and_goes_down_on_real_batches(image_data):
    dataset, normalizer = image_data
    assert_image_policy_learns(seeded_policy(unet_image_policy, normalizer), dataset, "pure-image UNet")


@pytest.mark.needs_data
def test_select_action_queues_and_replans(image_data):
    dataset, normalizer = image_data
    policy = seeded_policy(unet_image_policy, normalizer, num_inference_steps=2).eval()
    sample = dataset[50]
    frames = sample["obs"]["image"].numpy()  # (To, 3, 96, 96) in [0, 1], as PushTImageEnv renders
    positions = sample["obs"]["agent_pos"].numpy().astype(np.float64)  # the env returns float64

    plans, inputs = [], []
    original = policy.predict_action

    def recording_predict(obs_dict, generator=None):
        inputs.append({k: v.clone() for k, v in obs_dict.items()})
        plans.append(original(obs_dict, generator=generator))
        return plans[-1]

    policy.predict_action = recording_predict
    policy.reset()
    actions = [
        policy.select_action({"image": frames[t % TO], "agent_pos": positions[t % TO]}) for t in range(10)
    ]
    assert all(a.shape == (2,) for a in actions)
    assert len(plans) == 2  # replans at steps 0 and 8
    first = torch.as_tensor(positions[0], dtype=torch.float32)
    torch.testing.assert_close(inputs[0]["agent_pos"][0], torch.stack([first, first]))  # history filled
    torch.testing.assert_close(torch.stack(actions[:8]), plans[0]["action"][0])
    torch.testing.assert_close(torch.stack(actions[8:]), plans[1]["action"][0, :2])

    policy.reset()
    batched = policy.select_action(
        {"image": np.stack([frames[0]] * 3), "agent_pos": np.stack([positions[0]] * 3)}
    )
    assert batched.shape == (3, 2) and len(plans) == 3
    with pytest.raises(KeyError, match="agent_pos"):
        policy.select_action({"image": frames[0]})


@pytest.mark.needs_data
def test_use_sampler_swaps_the_scheduler(image_data):
    dataset, normalizer = image_data
    policy = seeded_policy(
        unet_image_policy, normalizer, scheduler=ddim(), num_inference_steps=2, eta=1.0
    ).eval()
    obs = {k: v[:, :TO] for k, v in real_batch(dataset, [10])["obs"].items()}
    calls = count_model_calls(policy)
    assert use_sampler(policy, "ddpm", 3) == "DDPMScheduler-3" and policy.kwargs == {}
    assert policy.predict_action(obs)["action"].shape == (1, TA, 2) and len(calls) == 3
    assert use_sampler(policy, "ddim", 2) == sampler_label(policy) == "DDIMScheduler-2"
    policy.predict_action(obs)
    assert len(calls) == 3 + 2


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"horizon": 18, "down_dims": [32, 64, 128]}, "horizon=18 is not divisible by 4"),
        ({"n_action_steps": 16}, r"n_action_steps=16 is not allowed: an integer <= 15"),
        ({"shape_meta": {"obs": SHAPE_META["obs"], "action": {}}}, "no action shape"),
        ({"shape_meta": {"action": {"shape": [2]}}}, "shape_meta has no 'obs' entry"),
        ({"noise_scheduler": ddpm("v_prediction")}, "prediction_type='v_prediction'"),
        ({"eta": 0.5}, r"unexpected policy arguments \['eta'\].*DDPMScheduler"),
        ({"obs_encoder": ChannelMean()}, r"ChannelMean has no output_shape\(\)"),
    ],
)
def test_policy_construction_errors(overrides, match):
    encoder = MultiImageObsEncoder(SHAPE_META, ChannelMean(), crop_shape=[76, 76])
    with pytest.raises(ValueError, match=match):
        unet_image_policy(encoder=encoder, **overrides)


# ---------------- through the command line ----------------
@pytest.mark.needs_data
def test_cli_trains_with_rollout_and_checkpoint_then_eval_scores(pusht_zarr_path, tmp_path):
    run_dir = tmp_path / "run"
    train_cli(run_dir, pusht_zarr_path, f"--config-name={IMAGE}", "debug=smoke_image")
    latest = run_dir / "checkpoints" / "latest.ckpt"
    payload = load_checkpoint_file(latest)
    assert payload["state"]["epoch"] == 2  # debug=smoke_image: 2 epochs, each with a rollout
    assert "MultiImageObsEncoder" in payload["cfg_yaml"]
    assert any(k.startswith("obs_encoder.key_model_map.image.") for k in payload["state_dicts"]["ema_model"])
    assert list((run_dir / "checkpoints").glob("epoch=*-test_mean_score=*.ckpt"))
    out = tmp_path / "eval"
    assert_ok(run_cli(["eval.py", "-c", str(latest), "-o", str(out), "-d", "cpu", "--noise-seed", "0"]))
    log = json.loads((out / "eval_log.json").read_text())
    # with seeded noise an evaluation is reproducible: the same checkpoint evaluated again, in this process
    assert (
        log["test/mean_score"]
        == evaluate_in_process(latest, tmp_path / "again", noise_seed=0)["test/mean_score"]
    )
