"""Every framework config value is checked before a run writes anything (issue 14).

The command-line cases run train.py; the rules and the fuzz run the same check in-process, which is what
train.py calls before Hydra creates the run directory (``hydra_checks.ValidateBeforeRun``).
"""

from __future__ import annotations

import copy
import os
import random
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import OmegaConf

from diffusion_policy.common.config_check import validate_config
from diffusion_policy.common.config_origin import ConfigSource
from diffusion_policy.common.config_resolvers import register_resolvers
from diffusion_policy.common.config_schema import CHECKED_KEYS
from diffusion_policy.common.errors import ConfigError
from tests.helpers import FIXTURES, REPO_ROOT, run_clis_side_by_side

CONFIG_DIR = REPO_ROOT / "config"
LOWDIM = "train_diffusion_unet_lowdim_workspace"
SMOKE = {
    LOWDIM: "smoke",
    "train_diffusion_unet_hybrid_workspace": "smoke_image",
    "train_diffusion_unet_image_workspace": "smoke_image",
    "train_diffusion_transformer_lowdim_pusht_workspace": "smoke_transformer",
    "train_diffusion_transformer_hybrid_workspace": "smoke_transformer_image",
}

register_resolvers()


def _compose(name: str, overrides: list[str] = (), config_dir: Path = CONFIG_DIR):
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return compose(config_name=name, overrides=list(overrides))


def _error(cfg, overrides: tuple[str, ...] = ()) -> str | None:
    try:
        validate_config(cfg, ConfigSource(overrides=overrides, description="the test config"))
    except ConfigError as e:
        return str(e)
    return None


# ----------------------------------------------------------------------------- the command line
BAD_RUNS = {
    "negative epochs": (["training.num_epochs=-1"], "training.num_epochs=-1", ">= 1"),
    "zero batch": (["dataloader.batch_size=0"], "dataloader.batch_size=0", ">= 1"),
    "negative warm-up": (["training.lr_warmup_steps=-5"], "training.lr_warmup_steps=-5", ">= 0"),
    "lr not a number": (["optimizer.lr=abc"], "optimizer.lr='abc'", "a number"),
}


@pytest.mark.needs_data
def test_bad_values_fail_in_one_line_with_exit_2_and_write_nothing(tmp_path, pusht_zarr_path):
    # a bad value in a config file (not on the command line) is traced to that file
    bad_file = tmp_path / "bad_original.yaml"
    text = (FIXTURES / "lowdim_unresolved_eval.yaml").read_text()
    assert "  rollout_every: 50\n" in text
    bad_file.write_text(text.replace("  rollout_every: 50\n", "  rollout_every: 0\n"))
    cases = {
        name: (["train.py", "debug=smoke", *args], (*needles, "set on the command line: " + args[0]))
        for name, (args, *needles) in BAD_RUNS.items()
    }
    cases["bad value in a file"] = (
        ["train.py", f"--config-dir={tmp_path}", "--config-name=bad_original", "training.device=cpu"],
        ("training.rollout_every=0", ">= 1", "from config bad_original"),
    )
    # a preset made for another root config (issue 23: this failed in the policy's constructor)
    cases["preset on another root config"] = (
        ["train.py", "experiment=pusht_lowdim_transformer_cpu"],
        (
            "experiment=pusht_lowdim_transformer_cpu",
            "--config-name=train_diffusion_transformer_lowdim_pusht_workspace",
        ),
    )
    data, run_dirs = (
        f"task.dataset.zarr_path={pusht_zarr_path}",
        {n: tmp_path / n.replace(" ", "_") for n in cases},
    )
    results = run_clis_side_by_side(
        {name: [*args, data, f"hydra.run.dir={run_dirs[name]}"] for name, (args, _) in cases.items()}
    )
    for name, proc in results.items():
        stderr = proc.stderr
        assert proc.returncode == 2, f"{name}: exit {proc.returncode}\n{stderr[-2000:]}"
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), f"{name}: {stderr[-2000:]}"
        for needle in cases[name][1]:
            assert needle in lines[0], f"{name}: {needle!r} not in {lines[0]!r}"
        assert not (tmp_path / name.replace(" ", "_")).exists(), f"{name}: the run directory was created"


# ----------------------------------------------------------------------------- what must keep loading
SHIPPED = (
    [(name, []) for name in SMOKE]
    + [(name, [f"debug={debug}"]) for name, debug in SMOKE.items()]
    + [
        (LOWDIM, ["experiment=quickstart"]),
        (LOWDIM, ["experiment=pusht_lowdim_cpu"]),
        ("train_diffusion_transformer_lowdim_pusht_workspace", ["experiment=pusht_lowdim_transformer_cpu"]),
        (LOWDIM, ["training.debug=True"]),
    ]
)


@pytest.mark.parametrize(
    ("name", "overrides"), SHIPPED, ids=lambda x: x if isinstance(x, str) else ",".join(x)
)
def test_shipped_configs_pass(name, overrides):
    assert _error(_compose(name, overrides)) is None


@pytest.mark.parametrize("fixture", sorted(p.stem for p in FIXTURES.glob("*.yaml")))
def test_original_configs_pass_resolved_or_not(fixture):
    cfg = _compose(fixture, config_dir=FIXTURES)
    assert _error(cfg) is None, "unresolved (${eval:} and interpolations)"
    OmegaConf.resolve(cfg)
    assert _error(cfg) is None, "resolved, as a checkpoint stores it"


# ----------------------------------------------------------------------------- rules
RULES = [
    # (overrides on debug=smoke, what the one line must contain)
    (
        ["horizon=8"],
        ["n_action_steps=8", "horizon=8", "set on the command line: horizon=8"],
    ),
    (["n_latency_steps=9"], ["n_latency_steps", "horizon=16"]),
    (["task.env_runner.n_action_steps=4"], ["task.env_runner.n_action_steps=4", "n_action_steps (8)"]),
    (["n_obs_steps=0"], ["n_obs_steps=0", "[1, 10000]", "set on the command line: n_obs_steps=0"]),
    (["training.checkpoint_every=0"], ["training.checkpoint_every=0", ">= 1"]),
    (["training.rollout_every=0"], ["training.rollout_every=0"]),
    (["val_dataloader.batch_size=-2"], ["val_dataloader.batch_size=-2"]),
    (["dataloader.num_workers=100000"], ["dataloader.num_workers=100000", "[0, 1024]"]),
    (["training.num_epochs=2.5"], ["training.num_epochs=2.5", "an integer"]),
    (["training.seed=-1"], ["training.seed=-1"]),
    (["training.mixed_precision=fp16"], ["training.mixed_precision", "fp16", "'bf16'"]),
    (["training.compile=yes"], ["training.compile='yes'", "true or false"]),
    (["training.channels_last=yes"], ["training.channels_last='yes'", "true or false"]),
    (["training.compile_mode=fastest"], ["training.compile_mode", "fastest", "reduce-overhead"]),
    (["training.device=gpu"], ["training.device='gpu'", "cuda:N"]),
    (["training.use_ema=maybe"], ["training.use_ema='maybe'", "true or false"]),
    (["training.lr_scheduler=cosin"], ["training.lr_scheduler='cosin'", "cosine"]),
    (["training.gradient_accumulate_every=4"], ["gradient_accumulate_every=4", "max_train_steps=3"]),
    (["optimizer.lr=0"], ["optimizer.lr=0", "(0, 1.0]"]),
    (["optimizer.betas=[0.9]"], ["optimizer.betas=[0.9]", "two floats"]),
    (["optimizer.weight_decay=20000"], ["optimizer.weight_decay=20000", "lr * weight_decay < 1"]),
    (["ema.min_value=0.5", "ema.max_value=0.4"], ["ema.min_value=0.5", "ema.max_value=0.4"]),
    (["checkpoint.topk.mode=maximum"], ["checkpoint.topk.mode='maximum'", "'max' or 'min'"]),
    (
        ["checkpoint.topk.format_str='e{epoch}-{loss}.ckpt'"],
        ["checkpoint.topk.format_str", "test_mean_score"],
    ),
    (["logging.mode=on"], ["logging.mode='on'", "'offline'"]),
    (["task.env_runner.n_train=0", "task.env_runner.n_test=0"], ["n_train + n_test >= 1"]),
    (["task.env_runner.max_steps=0"], ["task.env_runner.max_steps=0"]),
    (["task.env_runner.n_envs=0"], ["task.env_runner.n_envs=0", "or null"]),
    (["keypoint_visible_rate=1.5"], ["keypoint_visible_rate=1.5", "[0, 1]"]),
    # a value reached through an interpolation is reported under the key that holds it
    (["past_action_visible=3"], ["past_action_visible=3"]),
    (["task.obs_dim=0"], ["task.obs_dim=0 (used as obs_dim)"]),
]


@pytest.mark.parametrize(("overrides", "needles"), RULES, ids=lambda x: ",".join(x))
def test_rules_name_key_value_allowed_and_origin(overrides, needles):
    message = _error(_compose(LOWDIM, ["debug=smoke", *overrides]), ("debug=smoke", *overrides))
    assert message is not None, f"{overrides} was accepted"
    assert "\n" not in message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_image_shape_meta_is_checked():
    name = "train_diffusion_unet_hybrid_workspace"
    message = _error(_compose(name, ["debug=smoke_image", "task.shape_meta.obs.image.shape=[3,96]"]))
    assert "task.shape_meta.obs.image.shape=[3, 96] (used as shape_meta.obs.image.shape)" in message
    assert "[channels, height, width]" in message
    message = _error(_compose(name, ["debug=smoke_image", "task.shape_meta.obs.image.type=depth"]))
    assert "task.shape_meta.obs.image.type='depth'" in message and "'rgb' or 'low_dim'" in message


def test_workspace_checks_its_config_when_built_without_hydra(tmp_path):
    cfg = _compose(LOWDIM, ["debug=smoke", "training.max_val_steps=0"])
    with pytest.raises(
        ConfigError, match=r"training.max_val_steps=0 .* the config given to TrainDiffusionUnet"
    ):
        get_class(cfg._target_)(cfg, output_dir=tmp_path)


# ----------------------------------------------------------------------------- fuzz
N_MUTATIONS = 120
N_TRAINED = 4
# the blocks the schema owns (policy / model / scheduler arguments are checked by their classes)
FUZZ_PREFIXES = (
    "training.",
    "dataloader.",
    "val_dataloader.",
    "checkpoint.",
    "logging.",
    "ema.",
    "optimizer.",
    "task.env_runner.",
    "task.shape_meta.",
)
# every top-level key the schema reads, except keypoint_dim: no code reads it, so mutating it tests nothing
FUZZ_TOP = set(CHECKED_KEYS) - {"keypoint_dim"}
HUGE = 10**9


def _leaves(node: Any, path: tuple = ()) -> list[tuple[tuple, Any]]:
    """(path, value) of every scalar and every list (lists can be shortened) under ``node``."""
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _leaves(v, (*path, k))
    elif isinstance(node, list):
        out.append((path, node))
        for i, v in enumerate(node):
            out += _leaves(v, (*path, i))
    else:
        out.append((path, node))
    return out


def _in_scope(path: tuple) -> bool:
    key = ".".join(str(p) for p in path)
    return key in FUZZ_TOP or key.split(".")[0] in FUZZ_TOP or key.startswith(FUZZ_PREFIXES)


def _mutate(value: Any, rng: random.Random) -> tuple[str, Any]:
    if isinstance(value, list):
        return "shortened", value[:-1]
    if isinstance(value, bool):
        return "bool swapped", rng.choice([7, "abc"])
    if isinstance(value, int | float):
        kind = rng.choice(["negative", "zero", "huge", "non-numeric"])
        return kind, {
            "negative": -value if value else -1,
            "zero": 0,
            "huge": HUGE if isinstance(value, int) else float(HUGE),
            "non-numeric": "abc",
        }[kind]
    if isinstance(value, str):
        return "string swapped", rng.choice([-1, 0, 7, HUGE])
    return "null swapped", rng.choice([-1, 0, HUGE, "abc"])  # None


def _key(path: tuple) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _set(container: dict, path: tuple, value: Any) -> None:
    node = container
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value


@pytest.mark.needs_data
def test_fuzz_single_value_mutations(tmp_path, pusht_zarr_path, capsys):
    seed = int(os.environ.get("DP_FUZZ_SEED", "14"))
    with capsys.disabled():
        print(f"\nconfig fuzz: seed {seed} (rerun with DP_FUZZ_SEED={seed})")
    rng = random.Random(seed)
    bases = {}
    for name, debug in SMOKE.items():
        cfg = _compose(name, [f"debug={debug}", f"task.dataset.zarr_path={pusht_zarr_path}"])
        container = OmegaConf.to_container(cfg, resolve=False)
        bases[name] = (container, [leaf for leaf in _leaves(container) if _in_scope(leaf[0])])
    # the state recipe is the one trained below, so it gets half the mutations
    names = [LOWDIM] * len(SMOKE) + list(SMOKE)
    rejected, accepted = 0, []
    for i in range(N_MUTATIONS):
        name = rng.choice(names)
        base, leaves = bases[name]
        path, value = rng.choice(leaves)
        if isinstance(value, list) and not value:
            continue
        kind, new = _mutate(value, rng)
        key = _key(path)
        case = f"seed {seed} mutation {i}: {name} {key}: {value!r} -> {new!r} ({kind})"
        container = copy.deepcopy(base)
        _set(container, path, new)
        cfg = OmegaConf.create(container)
        try:
            validate_config(cfg, ConfigSource(overrides=(f"{key}={new}",)))
            OmegaConf.resolve(cfg)
            get_class(cfg._target_)(cfg, output_dir=tmp_path / f"run{i}")
        except ConfigError as e:
            message = str(e)
            assert "\n" not in message, f"{case}: not one line: {message!r}"
            assert key in message, f"{case}: the message does not name {key}: {message!r}"
            rejected += 1
            continue
        except Exception as e:  # a traceback a user would see
            raise AssertionError(f"{case}: {type(e).__name__}: {e}") from e
        accepted.append((case, name, key, cfg, tmp_path / f"run{i}"))
    assert rejected >= 30 and len(accepted) >= 10, (rejected, len(accepted))

    # accepted values must really train: a seeded sample of the state-recipe ones runs end to end
    state = [a for a in accepted if a[1] == LOWDIM]
    for case, _, key, cfg, run_dir in rng.sample(state, min(N_TRAINED, len(state))):
        if key == "training.num_epochs":
            # a huge epoch count is valid; the original's debug switch caps this run at 2 epochs
            cfg.training.debug = True
        workspace = get_class(cfg._target_)(cfg, output_dir=run_dir)
        run_dir.mkdir()  # Hydra's part on the command line
        try:
            workspace.run()
        except ConfigError as e:
            assert key in str(e) and "\n" not in str(e), f"{case}: {e}"
            continue
        except Exception as e:
            raise AssertionError(f"{case}: training failed: {type(e).__name__}: {e}") from e
        assert workspace.global_step > 0, f"{case}: exit 0 with nothing trained"
        assert Path(workspace.output_dir, "checkpoints", "latest.ckpt").is_file(), case


# ----------------------------------------------------------------------------- one rule, two callers
def test_the_classes_apply_the_schemas_rules_in_the_same_words(tmp_path):
    """A rule in common/rules.py gives the config check and the class that builds the thing one answer."""
    import torch

    from diffusion_policy.env_runner.pusht_keypoints_runner import PushTKeypointsRunner
    from diffusion_policy.model.common.lr_scheduler import get_scheduler
    from diffusion_policy.model.diffusion.ema_model import EMAModel

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    cases = [
        (
            ["ema.min_value=0.5", "ema.max_value=0.4"],
            lambda: EMAModel(torch.nn.Linear(1, 1), 0, 1.0, 0.75, 0.5, 0.4),
        ),
        (["ema.inv_gamma=0"], lambda: EMAModel(torch.nn.Linear(1, 1), inv_gamma=0)),
        (["training.lr_scheduler=cosin"], lambda: get_scheduler("cosin", optimizer, 1, 10)),
        (
            ["task.env_runner.test_start_seed=4294967296"],
            lambda: PushTKeypointsRunner(str(tmp_path), n_train=0, n_test=1, test_start_seed=4294967296),
        ),
    ]
    for overrides, build in cases:
        from_config = _error(_compose(LOWDIM, ["debug=smoke", *overrides]))
        with pytest.raises(ValueError) as from_class:
            build()
        # the same text, with the class's argument names for the config's keys
        rule = str(from_class.value).removeprefix("EMAModel: ")
        assert rule.split(" is not allowed: ")[1] in from_config.replace("ema.", ""), (rule, from_config)
        assert rule.split("=")[0] in from_config, (rule, from_config)
