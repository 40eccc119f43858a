"""Every config in config/ composes with Hydra's compose API, and its objects can be built."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from diffusion_policy.common.config_resolvers import register_resolvers
from diffusion_policy.common.hydra_checks import ConfigRejected, ValidateBeforeRun

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
LOWDIM = "train_diffusion_unet_lowdim_workspace"
HYBRID = "train_diffusion_unet_hybrid_workspace"
IMAGE = "train_diffusion_unet_image_workspace"
DPT_STATE = "train_diffusion_transformer_lowdim_pusht_workspace"
DPT_IMAGE = "train_diffusion_transformer_hybrid_workspace"
# experiment option -> the recipe it belongs to
EXPERIMENTS = {
    "pusht_lowdim_cpu": LOWDIM,
    "quickstart": LOWDIM,
    "pusht_lowdim_transformer_cpu": DPT_STATE,
    "pusht_image_cpu": HYBRID,
}

register_resolvers()


def _compose(name: str, overrides: list[str] = (), with_hydra: bool = False):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name=name, overrides=list(overrides), return_hydra_config=with_hydra)


def _group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


# every primary config on disk (files starting with "_" are shared blocks, not runnable on their own)
PRIMARY = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if not p.name.startswith("_"))


def test_every_config_file_is_covered():
    # new recipes join COMBOS automatically through PRIMARY; these must never go missing
    assert sorted([DPT_IMAGE, DPT_STATE, HYBRID, IMAGE, LOWDIM]) == PRIMARY
    assert {name for name, _ in COMBOS} == set(PRIMARY)
    assert _group_options("task") == ["custom_zarr", "pusht_image", "pusht_lowdim"]
    assert _group_options("policy/noise_scheduler") == ["ddim", "ddpm", "flow_matching"]
    assert _group_options("debug") == [
        "fast",
        "smoke",
        "smoke_image",
        "smoke_no_sim",
        "smoke_transformer",
        "smoke_transformer_image",
    ]
    assert _group_options("optimizer") == ["adamw", "transformer_hybrid", "transformer_lowdim"]
    assert _group_options("experiment") == sorted(EXPERIMENTS)


COMBOS = (
    [(name, []) for name in PRIMARY]
    + [(LOWDIM, [f"policy/noise_scheduler={o}"]) for o in _group_options("policy/noise_scheduler")]
    + [(LOWDIM, ["debug=smoke"]), (LOWDIM, ["debug=fast"])]
    + [(name, [f"experiment={o}"]) for o, name in EXPERIMENTS.items()]
    + [(HYBRID, ["debug=smoke_image"]), (IMAGE, ["debug=smoke_image"])]
    + [(DPT_STATE, ["debug=smoke_transformer"]), (DPT_IMAGE, ["debug=smoke_transformer_image"])]
    + [
        (name, [f"policy/noise_scheduler={o}"])
        for name in (HYBRID, IMAGE, DPT_STATE, DPT_IMAGE)
        for o in ("ddim", "flow_matching")
    ]
    + [(LOWDIM, ["experiment=pusht_lowdim_cpu", "policy/noise_scheduler=flow_matching"])]
    # the template for a task without a simulator, with every recipe that reads shape_meta
    + [(name, ["task=custom_zarr", "task.dataset.zarr_path=x.zarr"]) for name in (HYBRID, IMAGE, DPT_IMAGE)]
    + [(HYBRID, ["task=custom_zarr", "task.dataset.zarr_path=x.zarr", "debug=smoke_no_sim"])]
)


@pytest.mark.parametrize(
    ("name", "overrides"), COMBOS, ids=lambda x: x if isinstance(x, str) else ",".join(x)
)
def test_compose_resolves_and_targets_import(name, overrides):
    cfg = _compose(name, overrides)
    container = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    get_class(container["_target_"])
    for node in (container["policy"], container["task"]["dataset"], container["task"]["env_runner"]):
        if node is not None:  # task.env_runner: null is a task without a simulator
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


def test_image_defaults_are_the_original_pure_torch_recipe():
    c = OmegaConf.to_container(_compose(IMAGE), resolve=True)
    p = c["policy"]
    assert c["name"] == "train_diffusion_unet_image" and c["task"]["name"] == "pusht_image"
    assert p["_target_"].endswith("DiffusionUnetImagePolicy")
    enc = p["obs_encoder"]
    assert enc["_target_"].endswith("multi_image_obs_encoder.MultiImageObsEncoder")
    assert enc["shape_meta"] == c["shape_meta"]
    assert enc["rgb_model"] == {
        "_target_": "diffusion_policy.model.vision.model_getter.get_resnet",
        "name": "resnet18",
        "weights": None,
    }
    assert (enc["resize_shape"], enc["crop_shape"], enc["random_crop"]) == (None, [76, 76], True)
    assert (enc["use_group_norm"], enc["share_rgb_model"], enc["imagenet_norm"]) == (True, False, True)
    assert (p["diffusion_step_embed_dim"], p["down_dims"], p["kernel_size"], p["n_groups"]) == (
        128,
        [512, 1024, 2048],
        5,
        8,
    )
    assert p["cond_predict_scale"] and p["obs_as_global_cond"]
    assert (p["horizon"], p["n_obs_steps"], p["n_action_steps"], p["num_inference_steps"]) == (16, 2, 8, 100)
    assert (c["dataloader"]["batch_size"], c["dataloader"]["num_workers"]) == (64, 4)
    assert (c["val_dataloader"]["batch_size"], c["val_dataloader"]["num_workers"]) == (64, 4)
    assert c["training"]["num_epochs"] == 8000
    assert c["optimizer"]["_target_"] == "torch.optim.AdamW" and c["optimizer"]["lr"] == 1.0e-4


def test_ddim_swaps_only_the_sampler():
    base = OmegaConf.to_container(_compose(LOWDIM), resolve=True)
    ddim = OmegaConf.to_container(_compose(LOWDIM, ["policy/noise_scheduler=ddim"]), resolve=True)
    assert ddim["policy"]["noise_scheduler"]["_target_"].endswith("DDIMScheduler")
    assert ddim["policy"]["num_inference_steps"] == 8
    for k in ("model", "horizon", "n_action_steps"):
        assert ddim["policy"][k] == base["policy"][k]


@pytest.mark.parametrize("name", PRIMARY)
def test_flow_matching_swaps_only_the_objective_and_sampler(name):
    base = OmegaConf.to_container(_compose(name), resolve=True)
    flow = OmegaConf.to_container(_compose(name, ["policy/noise_scheduler=flow_matching"]), resolve=True)
    assert flow["policy"]["noise_scheduler"]["_target_"].endswith("flow_matching.FlowMatchingScheduler")
    assert "variance_type" not in flow["policy"]["noise_scheduler"]
    assert flow["policy"]["num_inference_steps"] == 8
    rest = {k: v for k, v in flow["policy"].items() if k not in ("noise_scheduler", "num_inference_steps")}
    assert rest == {
        k: v for k, v in base["policy"].items() if k not in ("noise_scheduler", "num_inference_steps")
    }
    assert instantiate(flow["policy"]["noise_scheduler"]).config.solver == "euler"


def test_command_line_flow_matching_wins_over_the_cpu_recipes_ddim():
    cfg = _compose(LOWDIM, ["experiment=pusht_lowdim_cpu", "policy/noise_scheduler=flow_matching"])
    recipe = _compose(LOWDIM, ["experiment=pusht_lowdim_cpu"])
    assert cfg.policy.noise_scheduler._target_.endswith("FlowMatchingScheduler")
    assert cfg.policy.model == recipe.policy.model and cfg.training == recipe.training


@pytest.mark.needs_data
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


def test_transformer_defaults_are_the_paper_recipes():
    c = OmegaConf.to_container(_compose(DPT_STATE), resolve=True)
    m = c["policy"]["model"]
    assert (m["input_dim"], m["output_dim"], m["cond_dim"], m["horizon"], m["n_obs_steps"]) == (
        2,
        2,
        20,
        16,
        2,
    )
    assert (m["n_layer"], m["n_head"], m["n_emb"], m["p_drop_emb"], m["p_drop_attn"]) == (
        8,
        4,
        256,
        0.0,
        0.01,
    )
    assert m["causal_attn"] and m["time_as_cond"] and m["obs_as_cond"] and m["n_cond_layers"] == 0
    assert c["optimizer"] == {"learning_rate": 1.0e-4, "weight_decay": 1.0e-1, "betas": [0.9, 0.95]}
    t = c["training"]
    assert (t["lr_warmup_steps"], t["num_epochs"], c["dataloader"]["batch_size"]) == (1000, 8000, 256)
    assert c["policy"]["num_inference_steps"] == 100 and c["policy"]["n_action_steps"] == 8

    c = OmegaConf.to_container(_compose(DPT_IMAGE), resolve=True)
    p = c["policy"]
    assert c["task"]["name"] == "pusht_image" and c["horizon"] == 10 and p["horizon"] == 10
    assert c["task"]["dataset"]["horizon"] == 10 and c["task"]["dataset"]["pad_after"] == 7
    assert (p["crop_shape"], p["obs_encoder_group_norm"], p["eval_fixed_crop"]) == ([76, 76], True, True)
    assert (p["n_layer"], p["n_head"], p["n_emb"], p["p_drop_attn"], p["n_cond_layers"]) == (
        8,
        4,
        256,
        0.3,
        0,
    )
    assert c["optimizer"] == {
        "transformer_weight_decay": 1.0e-3,
        "obs_encoder_weight_decay": 1.0e-6,
        "learning_rate": 1.0e-4,
        "betas": [0.9, 0.95],
    }
    assert (c["training"]["lr_warmup_steps"], c["training"]["num_epochs"]) == (1000, 3050)
    assert (c["dataloader"]["batch_size"], c["dataloader"]["num_workers"]) == (64, 8)


def test_transformer_cpu_recipe_keeps_the_paper_network_family():
    c = OmegaConf.to_container(_compose(DPT_STATE, ["experiment=pusht_lowdim_transformer_cpu"]), resolve=True)
    m = c["policy"]["model"]
    assert (m["n_layer"], m["n_emb"], m["n_head"], m["p_drop_attn"]) == (4, 128, 4, 0.01)
    assert c["policy"]["noise_scheduler"]["_target_"].endswith("DDIMScheduler")
    assert c["task"]["dataset"]["max_train_episodes"] is None
    assert c["optimizer"]["weight_decay"] == 0.1 and "_target_" not in c["optimizer"]


# ----------------------------------------------------------------------------- presets x root configs
PRESETS = [f"{group}={option}" for group in ("experiment", "debug") for option in _group_options(group)]


def _preset_check(name: str, preset: str):
    """(the composed config, the one line train.py stops with or None), as train.py's Hydra callback sees
    them (the callback node a preset declares, else the plain check)."""
    cfg = _compose(name, [preset], with_hydra=True)
    node = OmegaConf.select(cfg, "hydra.callbacks.validate_config")
    callback = instantiate(node) if node is not None else ValidateBeforeRun()
    try:
        callback.check(cfg, name)
    except ConfigRejected as rejected:
        return cfg, str(rejected.error)
    return cfg, None


@pytest.mark.parametrize("name", PRIMARY)
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_builds_on_its_root_config_or_names_the_right_one(name, preset):
    cfg, line = _preset_check(name, preset)
    if line is not None:
        # fails before anything is built, in one line that names a root config the preset fits
        assert "\n" not in line and line.startswith(f"{preset} is a preset for --config-name="), line
        right = line.split("--config-name=")[1].split()[0].rstrip(",")
        assert right != name and right in PRIMARY, line
        assert f"python train.py --config-name={right} {preset}" in line, line
        assert _preset_check(right, preset)[1] is None, f"{right} rejects {preset} too"
        return
    network, root_network = (
        {
            k: v
            for k, v in OmegaConf.to_container(c.policy, resolve=True).items()
            if k != "num_inference_steps"
        }
        for c in (cfg, _compose(name))
    )
    if network == root_network:
        return  # the preset changes only the sampling steps (debug=fast): the root config's own network
    policy = instantiate(cfg.policy)
    assert sum(p.numel() for p in policy.parameters()) > 0


def test_presets_that_change_the_network_name_their_root_configs():
    for preset in PRESETS:
        group = preset.split("=")[0]
        cfg = _compose(LOWDIM, [preset], with_hydra=True)
        roots = OmegaConf.select(cfg, f"hydra.callbacks.validate_config.root_configs.{group}")
        # debug=fast only shortens the schedule, so it fits every root config
        assert (roots is None) == (preset == "debug=fast"), f"{preset}: root_configs.{group}={roots}"
