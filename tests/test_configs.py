"""Every config in config/ composes with Hydra's compose API, and its objects can be built."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from diffusion_policy.common.config_resolvers import register_resolvers

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
LOWDIM = "train_diffusion_unet_lowdim_workspace"
HYBRID = "train_diffusion_unet_hybrid_workspace"

register_resolvers()


def _compose(name: str, overrides: list[str] = ()):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name=name, overrides=list(overrides))


def _group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def test_every_config_file_is_covered():
    primary = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if not p.name.startswith("_"))
    assert primary == [HYBRID, LOWDIM]
    assert _group_options("task") == ["pusht_image", "pusht_lowdim"]
    assert _group_options("policy/noise_scheduler") == ["ddim", "ddpm"]
    assert set(_group_options("debug")) == {"fast", "smoke", "smoke_image"}
    assert _group_options("experiment") == ["pusht_lowdim_cpu", "quickstart"]


COMBOS = (
    [(LOWDIM, [])]
    + [(LOWDIM, [f"policy/noise_scheduler={o}"]) for o in _group_options("policy/noise_scheduler")]
    + [(LOWDIM, ["debug=smoke"]), (LOWDIM, ["debug=fast"])]
    + [(LOWDIM, [f"experiment={o}"]) for o in _group_options("experiment")]
    + [(HYBRID, []), (HYBRID, ["debug=smoke_image"]), (HYBRID, ["policy/noise_scheduler=ddim"])]
)


@pytest.mark.parametrize(
    ("name", "overrides"), COMBOS, ids=lambda x: x if isinstance(x, str) else ",".join(x)
)
def test_compose_resolves_and_targets_import(name, overrides):
    cfg = _compose(name, overrides)
    container = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    get_class(container["_target_"])
    for node in (container["policy"], container["task"]["dataset"], container["task"]["env_runner"]):
        get_class(node["_target_"])
    get_class(container["policy"]["noise_scheduler"]["_target_"])
    assert "eval:" not in OmegaConf.to_yaml(cfg), "our configs use the safe `calc` resolver, never `eval`"


def test_lowdim_defaults_are_the_paper_recipe():
    c = OmegaConf.to_container(_compose(LOWDIM), resolve=True)
    assert (c["horizon"], c["n_obs_steps"], c["n_action_steps"]) == (16, 2, 8)
    m = c["policy"]["model"]
    assert (m["input_dim"], m["local_cond_dim"], m["global_cond_dim"]) == (2, None, 40)
    assert (m["diffusion_step_embed_dim"], m["down_dims"], m["kernel_size"], m["n_groups"]) == (
        256,
        [256, 512, 1024],
        5,
        8,
    )
    s = c["policy"]["noise_scheduler"]
    assert s["_target_"].endswith("DDPMScheduler")
    assert (s["num_train_timesteps"], s["beta_schedule"], s["variance_type"], s["prediction_type"]) == (
        100,
        "squaredcos_cap_v2",
        "fixed_small",
        "epsilon",
    )
    assert c["policy"]["num_inference_steps"] == 100 and c["policy"]["n_action_steps"] == 8
    assert c["ema"]["power"] == 0.75 and c["ema"]["max_value"] == 0.9999
    assert c["optimizer"] == {
        "_target_": "torch.optim.AdamW",
        "lr": 1.0e-4,
        "betas": [0.95, 0.999],
        "eps": 1.0e-8,
        "weight_decay": 1.0e-6,
    }
    assert (c["dataloader"]["batch_size"], c["dataloader"]["num_workers"]) == (256, 1)
    t = c["training"]
    assert (t["lr_scheduler"], t["lr_warmup_steps"], t["num_epochs"]) == ("cosine", 500, 5000)
    assert (t["rollout_every"], t["checkpoint_every"], t["val_every"], t["sample_every"]) == (50, 50, 1, 5)
    d = c["task"]["dataset"]
    assert (d["pad_before"], d["pad_after"], d["val_ratio"], d["max_train_episodes"]) == (1, 7, 0.02, 90)
    r = c["task"]["env_runner"]
    assert (r["n_train"], r["n_test"], r["max_steps"], r["test_start_seed"], r["legacy_test"]) == (
        6,
        50,
        300,
        100000,
        True,
    )
    assert (
        c["checkpoint"]["topk"]["format_str"]
        == "epoch={epoch:04d}-test_mean_score={test_mean_score:.3f}.ckpt"
    )
    assert c["logging"]["mode"] == "offline"


def test_hybrid_defaults_are_the_published_pusht_image_recipe():
    c = OmegaConf.to_container(_compose(HYBRID), resolve=True)
    p = c["policy"]
    assert c["task"]["name"] == "pusht_image" and p["crop_shape"] == [84, 84]
    assert (p["diffusion_step_embed_dim"], p["down_dims"]) == (128, [512, 1024, 2048])
    assert p["obs_encoder_group_norm"] and p["eval_fixed_crop"]
    assert (c["dataloader"]["batch_size"], c["dataloader"]["num_workers"], c["training"]["num_epochs"]) == (
        64,
        8,
        3050,
    )
    assert c["shape_meta"]["obs"]["image"]["shape"] == [3, 96, 96]
    assert c["task"]["dataset"]["n_obs_steps"] == 2


def test_ddim_swaps_only_the_sampler():
    base = OmegaConf.to_container(_compose(LOWDIM), resolve=True)
    ddim = OmegaConf.to_container(_compose(LOWDIM, ["policy/noise_scheduler=ddim"]), resolve=True)
    assert ddim["policy"]["noise_scheduler"]["_target_"].endswith("DDIMScheduler")
    assert ddim["policy"]["num_inference_steps"] == 8
    for k in ("model", "horizon", "n_action_steps"):
        assert ddim["policy"][k] == base["policy"][k]


def test_instantiate_lowdim_policy_dataset_runner(pusht_zarr_path, tmp_path):
    cfg = _compose(LOWDIM, ["debug=smoke", f"task.dataset.zarr_path={pusht_zarr_path}"])
    policy = instantiate(cfg.policy)
    dataset = instantiate(cfg.task.dataset)
    sample = dataset[0]
    assert tuple(sample["obs"].shape) == (cfg.horizon, cfg.task.obs_dim)
    runner = instantiate(cfg.task.env_runner, output_dir=str(tmp_path))
    if hasattr(runner, "close"):
        runner.close()
    # full-size recipe network builds too (65.8 M params in the paper's config)
    full = instantiate(_compose(LOWDIM).policy)
    n_params = sum(p.numel() for p in full.model.parameters())
    assert 65_000_000 < n_params < 66_500_000
    assert policy is not None


def test_instantiate_hybrid_smoke_policy(tmp_path):
    cfg = _compose(HYBRID, ["debug=smoke_image"])
    policy = instantiate(cfg.policy)
    assert sum(p.numel() for p in policy.parameters()) > 0
    runner = instantiate(cfg.task.env_runner, output_dir=str(tmp_path))
    if hasattr(runner, "close"):
        runner.close()
