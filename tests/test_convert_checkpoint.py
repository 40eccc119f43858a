"""convert_checkpoint.py: checkpoints written the original's way (dill + torch.save) open safely and convert
into checkpoints that evaluate, plan and resume training like native ones (CPU, tiny networks).

The fixtures cannot run the original code; they are written the way its ``BaseWorkspace.save_checkpoint``
writes (same payload layout, a resolved Hydra ``DictConfig`` with its ``${now:}`` resolver cache,
``state_dict()``s copied to CPU as its saving thread does, ``dill.dumps`` counters) from this framework's own
policies, whose parameter names, shapes and math are the original's. The order is the original's, taken from
``fixtures/original_parameter_order.json`` (data read off the original code), not from this framework's
classes: parameters come first in the model state dicts in that order, and the AdamW state is stored by
position in the original's optimizer groups.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dill
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from diffusion_policy.common.checkpoint_io import load_checkpoint_file, save_checkpoint_file
from diffusion_policy.common.config_resolvers import register_resolvers
from diffusion_policy.common.errors import CheckpointError
from diffusion_policy.common.json_logger import read_json_log
from diffusion_policy.common.legacy_checkpoint import (
    counters_from_original,
    read_original_checkpoint,
)
from diffusion_policy.common.normalize_util import get_image_range_normalizer
from diffusion_policy.model.common.lr_scheduler import get_scheduler
from diffusion_policy.model.common.normalizer import LinearNormalizer
from diffusion_policy.workspace.base_workspace import load_policy
from tests.helpers import (
    ENV,
    assert_ok,
    load_script,
    run_cli,
    train_cli,
)
from tests.helpers import assert_one_line_error as one_line_error

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "config"

# Every PushT policy type: (config name, tiny-size overrides). Adding a policy type is one line here.
POLICY_CONFIGS = [
    ("train_diffusion_unet_lowdim_workspace", ["debug=smoke"]),
    ("train_diffusion_unet_hybrid_workspace", ["debug=smoke_image"]),
    ("train_diffusion_unet_image_workspace", ["debug=smoke_image"]),
    ("train_diffusion_transformer_lowdim_pusht_workspace", ["debug=smoke_transformer"]),
    ("train_diffusion_transformer_hybrid_workspace", ["debug=smoke_transformer_image"]),
]
LOWDIM = POLICY_CONFIGS[0]
UNET_CONFIGS = POLICY_CONFIGS[:3]
ORIGINAL_ORDER = {
    entry["config_name"]: entry
    for entry in json.loads((REPO_ROOT / "tests" / "fixtures" / "original_parameter_order.json").read_text())[
        "policies"
    ].values()
}

register_resolvers()


# ----------------------------------------------------------------------------- fixtures, the original's way
@dataclass
class OriginalRun:
    cfg: DictConfig
    workspace: Any  # this framework's workspace that produced the weights
    lr_scheduler: Any
    ema: Any
    epoch: int  # as the original stores them
    global_step: int


def _copy_to_cpu(x: Any) -> Any:
    # what the original's saving thread stores: tensors on CPU, dicts and lists rebuilt, the rest deep-copied
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu")
    if isinstance(x, dict):
        return {k: _copy_to_cpu(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_copy_to_cpu(v) for v in x]
    return copy.deepcopy(x)


def _random_batch(cfg: DictConfig, batch_size: int = 2) -> dict[str, Any]:
    T = int(cfg.horizon)
    if "shape_meta" in cfg:
        obs = {}
        for key, meta in cfg.shape_meta.obs.items():
            obs[key] = torch.rand(batch_size, T, *meta.shape)
        action = torch.rand(batch_size, T, *cfg.shape_meta.action.shape) * 2 - 1
        return {"obs": obs, "action": action}
    return {
        "obs": torch.randn(batch_size, T, int(cfg.obs_dim)),
        "action": torch.randn(batch_size, T, int(cfg.action_dim)),
    }


def _normalizer(cfg: DictConfig, batch: dict[str, Any]) -> LinearNormalizer:
    normalizer = LinearNormalizer()
    if "shape_meta" in cfg:
        rgb = [k for k, m in cfg.shape_meta.obs.items() if m.type == "rgb"]
        normalizer.fit({k: v for k, v in batch["obs"].items() if k not in rgb} | {"action": batch["action"]})
        for key in rgb:
            normalizer[key] = get_image_range_normalizer()
    else:
        normalizer.fit(batch)
    return normalizer


def original_optimizer_groups(config_name: str) -> list[list[str]]:
    """Parameter names of each AdamW group, in the order of the original's ``parameters()`` /
    ``get_optimizer()``: the order its checkpoints store moments in."""
    entry = ORIGINAL_ORDER[config_name]
    return entry.get("optimizer_groups", [entry["named_parameters"]])


def in_original_layout(config_name: str, workspace: Any) -> dict[str, dict]:
    """model / ema_model / optimizer state dicts laid out as the original's code lays them out."""
    names = ORIGINAL_ORDER[config_name]["named_parameters"]
    layout = {}
    for part in ("model", "ema_model"):
        sd = getattr(workspace, part).state_dict()
        assert set(names) <= set(sd), f"{part} lacks parameters the original has"
        layout[part] = {k: sd[k] for k in names} | {k: v for k, v in sd.items() if k not in names}
    # the optimizer's state re-keyed from this code's positions to the original's
    optimizer = workspace.optimizer
    ours = optimizer.state_dict()
    name_of = {id(p): n for n, p in workspace.model.named_parameters()}
    position = {
        name_of[id(p)]: i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])
    }
    groups = original_optimizer_groups(config_name)
    flat = [n for group in groups for n in group]
    assert sorted(flat) == sorted(position), "the optimizer holds other parameters than the original's"
    state = {i: ours["state"][position[n]] for i, n in enumerate(flat) if position[n] in ours["state"]}
    offsets = [sum(len(g) for g in groups[:i]) for i in range(len(groups))]
    param_groups = [
        {**{k: v for k, v in ours_group.items() if k != "params"}, "params": list(range(o, o + len(g)))}
        for ours_group, g, o in zip(ours["param_groups"], groups, offsets, strict=True)
    ]
    layout["optimizer"] = {"state": state, "param_groups": param_groups}
    return layout


def train_steps(workspace: Any, lr_scheduler: Any, ema: Any, batches: list[dict[str, Any]]) -> None:
    """The original's training step on each batch (loss noise drawn from the global torch RNG)."""
    workspace.model.train()
    for batch in batches:
        loss = workspace.model.compute_loss(batch)
        loss.backward()
        workspace.optimizer.step()
        workspace.optimizer.zero_grad()
        lr_scheduler.step()
        ema.step(workspace.model)


def assert_optimizer_state_by_name(
    payload: dict, run: OriginalRun, groups: list[list[str]], tmp: Path
) -> None:
    """A workspace loaded from the converted ``payload`` holds, for every parameter name, the source run's
    optimizer state of the parameter of that name, and each group's hyperparameters."""
    cfg = OmegaConf.create(payload["cfg_yaml"])
    converted = get_class(cfg._target_)(cfg, output_dir=str(tmp))
    converted.load_payload(payload, attrs=("model", "optimizer"))
    got_params, want_params = (
        dict(converted.model.named_parameters()),
        dict(run.workspace.model.named_parameters()),
    )
    got_opt, want_opt = converted.optimizer, run.workspace.optimizer
    for names, got_group, want_group in zip(groups, got_opt.param_groups, want_opt.param_groups, strict=True):
        assert [id(p) for p in got_group["params"]] == [id(got_params[n]) for n in names]
        for key in ("lr", "initial_lr", "weight_decay", "betas"):
            assert got_group[key] == want_group[key], key
        for name in names:
            got, want = got_opt.state.get(got_params[name], {}), want_opt.state.get(want_params[name], {})
            assert got.keys() == want.keys(), name
            for key, value in want.items():
                assert torch.equal(torch.as_tensor(got[key]), torch.as_tensor(value)), f"{name} {key}"
    assert len(got_opt.state) == len(want_opt.state) > 0


def compose_original_cfg(config_name: str, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(config_name=config_name, overrides=list(overrides))
    # the original's train.py resolves the config once (every ${now:} then shares one cached timestamp)
    OmegaConf.resolve(cfg)
    return cfg


def write_original_checkpoint(
    path: Path,
    config_name: str,
    overrides: list[str],
    n_steps: int = 2,
    edit_cfg=None,
    edit_payload=None,
) -> OriginalRun:
    """Train ``n_steps`` optimizer steps in one epoch and save as the original's workspace would."""
    cfg = compose_original_cfg(config_name, overrides)
    workspace = get_class(cfg._target_)(cfg, output_dir=str(path.parent))
    torch.manual_seed(0)
    batches = [_random_batch(cfg) for _ in range(n_steps)]
    normalizer = _normalizer(cfg, batches[0])
    workspace.model.set_normalizer(normalizer)
    workspace.ema_model.set_normalizer(normalizer)
    t = cfg.training
    # as the original: lr schedule built with last_epoch=global_step-1, fresh EMA helper, one step per batch
    lr_scheduler = get_scheduler(
        t.lr_scheduler,
        optimizer=workspace.optimizer,
        num_warmup_steps=t.lr_warmup_steps,
        num_training_steps=n_steps * t.num_epochs,
        last_epoch=-1,
    )
    ema = instantiate(cfg.ema, model=workspace.ema_model)
    train_steps(workspace, lr_scheduler, ema, batches)
    # saved before the end-of-epoch increments: epoch index 0, global_step = steps done - 1
    epoch, global_step = 0, n_steps - 1
    if edit_cfg is not None:
        with open_dict(cfg):
            edit_cfg(cfg)
    payload = {
        "cfg": cfg,
        "state_dicts": _copy_to_cpu(in_original_layout(config_name, workspace)),
        "pickles": {
            "_output_dir": dill.dumps(str(path.parent)),
            "global_step": dill.dumps(global_step),
            "epoch": dill.dumps(epoch),
        },
    }
    if edit_payload is not None:
        edit_payload(payload)
    with path.open("wb") as f:
        torch.save(payload, f, pickle_module=dill)
    return OriginalRun(cfg, workspace, lr_scheduler, ema, epoch, global_step)


@pytest.fixture(scope="module")
def lowdim_original(tmp_path_factory) -> tuple[Path, OriginalRun]:
    path = tmp_path_factory.mktemp("original") / "epoch=0000-test_mean_score=0.500.ckpt"
    return path, write_original_checkpoint(path, *LOWDIM)


def assert_one_line_error(code: int, stderr: str, *needles: str) -> str:
    return one_line_error(subprocess.CompletedProcess([], code, "", stderr), *needles, exit_code=2)


def _convert_main():
    return load_script(REPO_ROOT / "convert_checkpoint.py", "dp_convert_cli").main


def convert_in_process(capsys, src: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = _convert_main()([str(src), str(out), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ----------------------------------------------------------------------------- counters
def test_counters_map_the_originals_pre_increment_values():
    # the original saves after epoch index e, before `global_step += 1; epoch += 1`
    steps_per_epoch = 42
    for e in (0, 1, 550):
        steps_done = (e + 1) * steps_per_epoch
        assert counters_from_original(e, steps_done - 1) == (e + 1, steps_done)


# ----------------------------------------------------------------------------- every policy type, exactly
@pytest.mark.parametrize(("config_name", "overrides"), POLICY_CONFIGS, ids=[c for c, _ in POLICY_CONFIGS])
def test_conversion_keeps_weights_and_actions_bit_for_bit(config_name, overrides, tmp_path, capsys):
    src, out = tmp_path / "original.ckpt", tmp_path / "converted.ckpt"
    run = write_original_checkpoint(src, config_name, overrides, n_steps=2)
    code, stdout, stderr = convert_in_process(capsys, src, out)
    assert code == 0, stderr
    notes = [ln for ln in stdout.splitlines() if ln.startswith("not in the original's file")]
    assert len(notes) == 1 and "LR schedule at step 2" in notes[0] and "training.seed=42" in notes[0]

    payload = load_checkpoint_file(out)  # a native checkpoint: loads with weights_only=True
    assert payload["state"]["epoch"] == 1 and payload["state"]["global_step"] == 2
    assert payload["state"]["wandb_run_id"] is None
    sd = payload["state_dicts"]
    for name in ("model", "ema_model"):
        source = getattr(run.workspace, name).state_dict()
        assert sd[name].keys() == source.keys()
        for k, v in source.items():
            assert torch.equal(sd[name][k], v), f"{name}.{k}"
    # every AdamW moment sits on the parameter of its name, in the group the original put it in
    assert_optimizer_state_by_name(payload, run, original_optimizer_groups(config_name), tmp_path)
    # what the original never saved comes back as the run that wrote the file had it
    assert sd["ema"] == run.ema.state_dict()
    sched = run.lr_scheduler.state_dict()
    for key in ("last_epoch", "base_lrs", "_last_lr"):
        assert sd["lr_scheduler"][key] == sched[key], key
    assert sd["topk_manager"] == {"path_value_map": {}}

    # the converted policy plans exactly what the source policy plans from the same initial noise
    policy, cfg = load_policy(out, "cpu")
    source_policy = run.workspace.ema_model.eval()
    # frozen like the EMA copy the source run samples with: torch picks its attention kernel by
    # requires_grad, and the two kernels differ in the last bits
    policy.requires_grad_(False)
    torch.manual_seed(1)
    obs = _random_batch(cfg)["obs"]
    obs_dict = obs if isinstance(obs, dict) else {"obs": obs}
    got = policy.predict_action(obs_dict, generator=torch.Generator().manual_seed(7))
    want = source_policy.predict_action(obs_dict, generator=torch.Generator().manual_seed(7))
    assert torch.equal(got["action"], want["action"])
    assert torch.equal(got["action_pred"], want["action_pred"])
    assert OmegaConf.to_container(cfg) == OmegaConf.to_container(run.cfg)


@pytest.mark.parametrize(("config_name", "overrides"), POLICY_CONFIGS, ids=[c for c, _ in POLICY_CONFIGS])
def test_training_on_from_the_converted_file_equals_training_on_from_the_source(
    config_name, overrides, tmp_path, capsys
):
    """The next steps from the converted file give the weights the source run gets with its own, correctly
    placed, AdamW moments."""
    src, out = tmp_path / "original.ckpt", tmp_path / "converted.ckpt"
    n_steps = 2
    run = write_original_checkpoint(src, config_name, overrides, n_steps=n_steps)
    code, _, stderr = convert_in_process(capsys, src, out)
    assert code == 0, stderr
    payload = load_checkpoint_file(out)
    cfg = OmegaConf.create(payload["cfg_yaml"])
    workspace = get_class(cfg._target_)(cfg, output_dir=str(tmp_path))
    t = cfg.training
    # the source run's schedule: the converted file positions it, the resuming run supplies its length
    workspace.lr_scheduler = get_scheduler(
        t.lr_scheduler,
        optimizer=workspace.optimizer,
        num_warmup_steps=t.lr_warmup_steps,
        num_training_steps=n_steps * t.num_epochs,
    )
    workspace.ema = instantiate(cfg.ema, model=workspace.ema_model)
    workspace.load_payload(payload, restore_rng=False)

    torch.manual_seed(3)
    batches = [_random_batch(cfg) for _ in range(3)]
    torch.manual_seed(5)
    train_steps(workspace, workspace.lr_scheduler, workspace.ema, batches)
    torch.manual_seed(5)
    train_steps(run.workspace, run.lr_scheduler, run.ema, batches)
    for part in ("model", "ema_model"):
        want = getattr(run.workspace, part).state_dict()
        got = getattr(workspace, part).state_dict()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7, msg=f"{part}.{key}")
    changed = [
        k
        for k, v in run.workspace.model.state_dict().items()
        if not torch.equal(v, payload["state_dicts"]["model"][k])
    ]
    assert changed, "the extra steps did not train"


def _reverse_parameter_order(payload: dict) -> None:
    """Lay the lowdim file out in the reverse parameter order, consistently: as if the writer had registered
    its modules the other way round."""
    names = ORIGINAL_ORDER[LOWDIM[0]]["named_parameters"]
    state_dicts = payload["state_dicts"]
    for part in ("model", "ema_model"):
        sd = state_dicts[part]
        state_dicts[part] = {k: sd[k] for k in reversed(names)} | {
            k: v for k, v in sd.items() if k not in names
        }
    opt = state_dicts["optimizer"]
    n = len(names)
    opt["state"] = {n - 1 - i: v for i, v in opt["state"].items()}
    assert opt["param_groups"][0]["params"] == list(range(n))


def test_any_consistent_parameter_order_converts_the_same(tmp_path, capsys):
    run = write_original_checkpoint(tmp_path / "original.ckpt", *LOWDIM, n_steps=2)
    src = tmp_path / "reversed.ckpt"
    write_original_checkpoint(src, *LOWDIM, n_steps=2, edit_payload=_reverse_parameter_order)
    code, _, stderr = convert_in_process(capsys, src, tmp_path / "converted.ckpt")
    assert code == 0, stderr
    payload = load_checkpoint_file(tmp_path / "converted.ckpt")
    assert_optimizer_state_by_name(payload, run, original_optimizer_groups(LOWDIM[0]), tmp_path)


def test_moments_that_do_not_fit_their_parameters_are_refused(tmp_path, capsys):
    # the model state dict in one order, the moments in another: the first parameter's moment has the
    # shape of the last parameter, and the converter says so instead of loading it
    def reorder_model_only(payload: dict) -> None:
        names = ORIGINAL_ORDER[LOWDIM[0]]["named_parameters"]
        sd = payload["state_dicts"]["model"]
        payload["state_dicts"]["model"] = {k: sd[k] for k in reversed(names)} | {
            k: v for k, v in sd.items() if k not in names
        }

    src, out = tmp_path / "mixed.ckpt", tmp_path / "out.ckpt"
    write_original_checkpoint(src, *LOWDIM, n_steps=1, edit_payload=reorder_model_only)
    code, _, stderr = convert_in_process(capsys, src, out)
    assert_one_line_error(code, stderr, "mixed.ckpt", "optimizer state 'exp_avg' of parameter", "has shape")
    assert not out.exists()


def test_readme_example_runs_as_written(tmp_path):
    """The README's two commands under "Open the original's checkpoints", run as written on a file the
    original's way (the state UNet policy, as its example), from a directory holding that file."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("### Open the original's checkpoints", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#", 1)[0].split() for line in block.strip().splitlines()]
    assert [c[:2] for c in commands] == [["python", "convert_checkpoint.py"], ["python", "eval.py"]]
    source = commands[0][2]
    write_original_checkpoint(tmp_path / source, *LOWDIM, n_steps=2)
    for command in commands:
        script = str(REPO_ROOT / command[1])
        proc = subprocess.run(
            [sys.executable, script, *command[2:]], cwd=tmp_path, env=ENV, capture_output=True, text=True
        )
        assert_ok(proc)
    converted = tmp_path / commands[0][3]
    assert load_checkpoint_file(converted)["state"]["epoch"] == 1
    out_dir = tmp_path / commands[1][commands[1].index("-o") + 1]
    log = json.loads((out_dir / "eval_log.json").read_text())
    assert set(log) >= {"test/mean_score", "test/success_rate"}


def test_reader_returns_plain_data_only(lowdim_original):
    path, run = lowdim_original
    original = read_original_checkpoint(path)
    assert (original.epoch, original.global_step) == (run.epoch, run.global_step)
    assert original.output_dir == str(path.parent)
    assert type(original.cfg) is dict and original.cfg["_target_"] == run.cfg._target_
    # the fixture really holds what the original's files hold: a DictConfig with Hydra's resolver cache
    assert run.cfg._metadata.resolver_cache["now"], "no ${now:} resolver cache in the fixture config"
    with zipfile.ZipFile(path) as zf:
        data = zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))
    for name in (b"dill._dill", b"_load_type", b"collections\ndefaultdict", b"omegaconf.dictconfig"):
        assert name in data, name


def test_native_loader_points_at_the_converter(lowdim_original):
    path, _ = lowdim_original
    with pytest.raises(CheckpointError, match="convert_checkpoint.py") as info:
        load_checkpoint_file(path)
    assert "\n" not in str(info.value)


def test_converter_runs_without_dill_installed(lowdim_original, tmp_path):
    path, _ = lowdim_original
    out = tmp_path / "no_dill.ckpt"
    proc = run_cli(
        ["convert_checkpoint.py", str(path), str(out)],
        prelude="import sys; sys.modules['dill'] = None",  # any `import dill` now fails
    )
    assert_ok(proc)
    assert out.is_file() and "rebuilt as a fresh run at epoch 1" in proc.stdout


# ----------------------------------------------------------------------------- refusing unsafe files
class _Shell:
    """Pickles as a call to os.system: the classic malicious checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Exec:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _plant_in_state_dict(payload, evil):
    payload["state_dicts"]["model"]["extra"] = evil


def _plant_in_pickles(payload, evil):
    payload["pickles"]["global_step"] = dill.dumps(evil)


def _plant_in_cfg_value(cfg, evil):
    cfg._get_node("exp_name")._val = evil


def _plant_in_resolver_cache(cfg, evil):
    cfg._metadata.resolver_cache["now"][("%Y",)] = evil


PLANTS = {
    "state_dicts": ("payload", _plant_in_state_dict),
    "pickles_blob": ("payload", _plant_in_pickles),
    "config_value": ("cfg", _plant_in_cfg_value),
    "config_resolver_cache": ("cfg", _plant_in_resolver_cache),
}


@pytest.mark.parametrize("where", list(PLANTS))
@pytest.mark.parametrize(
    ("evil_cls", "name"), [(_Shell, "system"), (_Exec, "exec")], ids=["os.system", "exec"]
)
def test_malicious_globals_are_refused_without_running(where, evil_cls, name, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = evil_cls(marker)
    kind, plant = PLANTS[where]
    src, out = tmp_path / "evil.ckpt", tmp_path / "out.ckpt"
    kwargs = {"edit_cfg" if kind == "cfg" else "edit_payload": lambda x: plant(x, evil)}
    write_original_checkpoint(src, *LOWDIM, n_steps=1, **kwargs)
    assert not marker.exists()
    code, _, stderr = convert_in_process(capsys, src, out)
    line = assert_one_line_error(code, stderr, "evil.ckpt", "refused", name)
    assert ("pickles['global_step']" in line) == (where == "pickles_blob")
    assert not marker.exists(), "the malicious pickle ran"
    assert not out.exists()


def test_malicious_checkpoint_via_the_command_line(tmp_path):
    marker = tmp_path / "pwned"
    src, out = tmp_path / "evil.ckpt", tmp_path / "out.ckpt"
    write_original_checkpoint(
        src, *LOWDIM, n_steps=1, edit_payload=lambda p: _plant_in_state_dict(p, _Shell(marker))
    )
    proc = run_cli(["convert_checkpoint.py", str(src), str(out)])
    assert_one_line_error(proc.returncode, proc.stderr, "posix.system", "not on the allowlist")
    assert not marker.exists() and not out.exists()


def test_dill_load_type_only_gives_builtin_data_types(tmp_path, capsys):
    # dill._dill._load_type('CodeType') would hand out the code-object constructor
    crafted = b"\x80\x02cdill._dill\n_load_type\nX\x08\x00\x00\x00CodeType\x85R."
    src, out = tmp_path / "code_type.ckpt", tmp_path / "out.ckpt"
    write_original_checkpoint(
        src, *LOWDIM, n_steps=1, edit_payload=lambda p: p["pickles"].__setitem__("epoch", crafted)
    )
    code, _, stderr = convert_in_process(capsys, src, out)
    assert_one_line_error(code, stderr, "dill._dill._load_type('CodeType')", "pickles['epoch']")
    assert not out.exists()
    # a plain value of the wrong kind in a blob is refused too
    write_original_checkpoint(
        src, *LOWDIM, n_steps=1, edit_payload=lambda p: p["pickles"].__setitem__("epoch", dill.dumps([1]))
    )
    code, _, stderr = convert_in_process(capsys, src, out)
    assert_one_line_error(code, stderr, "pickles['epoch']", "list")


def test_truncated_and_foreign_files_are_refused(lowdim_original, tmp_path, capsys):
    path, _ = lowdim_original
    data = path.read_bytes()
    cases: dict[str, tuple[bytes | None, str]] = {
        "truncated.ckpt": (data[: len(data) // 2], "truncated"),
        "notes.ckpt": (b"these are not the weights you are looking for\n", "not a torch checkpoint"),
        "raw_pickle.ckpt": (pickle.dumps({"cfg": 1}), "not a torch checkpoint"),
        "empty.zip": (None, "no data.pkl"),
        "plain_dict.ckpt": (None, "not an original Diffusion Policy checkpoint"),
        "native.ckpt": (None, "already in this framework's format"),
    }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/readme.txt", "hello")
    cases["empty.zip"] = (buf.getvalue(), cases["empty.zip"][1])
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "plain_dict.ckpt")
    save_checkpoint_file({"cfg_yaml": "a: 1\n", "state_dicts": {}, "state": {}}, tmp_path / "native.ckpt")
    for name, (content, needle) in cases.items():
        src, out = tmp_path / name, tmp_path / f"{name}.out"
        if content is not None:
            src.write_bytes(content)
        code, _, stderr = convert_in_process(capsys, src, out)
        assert_one_line_error(code, stderr, name, needle)
        assert not out.exists(), name
    code, _, stderr = convert_in_process(capsys, tmp_path / "missing.ckpt", tmp_path / "x.ckpt")
    assert_one_line_error(code, stderr, "missing.ckpt", "does not exist")


def test_config_naming_code_this_framework_lacks_is_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    cases = {
        "workspace": (
            lambda c: setattr(
                c, "_target_", "diffusion_policy.workspace.train_bet_workspace.TrainBetWorkspace"
            ),
            [
                "workspace",
                "diffusion_policy.workspace.train_bet_workspace.TrainBetWorkspace",
                "does not have",
            ],
        ),
        "policy": (
            lambda c: setattr(
                c.policy, "_target_", "diffusion_policy.policy.ibc_dfo_lowdim_policy.IbcDfoPolicy"
            ),
            ["policy", "diffusion_policy.policy.ibc_dfo_lowdim_policy.IbcDfoPolicy", "does not have"],
        ),
        # a config _target_ is code too: it is never built when it lies outside this framework's classes
        "hidden_call": (
            lambda c: c.policy.model.merge_with({"_target_": "os.system", "_args_": [f"touch {marker}"]}),
            ["policy.model._target_", "'os.system'", "does not build"],
        ),
        # Hydra follows attribute chains: a name under an allowed package can still reach os.system
        "attribute_chain": (
            lambda c: c.policy.model.merge_with(
                {
                    "_target_": "diffusion_policy.workspace.train_diffusion_workspace.os.system",
                    "_args_": [f"touch {marker}"],
                }
            ),
            ["policy.model._target_", "train_diffusion_workspace.os.system", "does not build"],
        ),
        # a leftover interpolation may not read the environment (or use any resolver but eval/calc/now)
        "env_resolver": (
            lambda c: setattr(c, "exp_name", "${oc.env:HOME}"),
            ["exp_name", "'oc.env:'", "does not run"],
        ),
    }
    for name, (edit, needles) in cases.items():
        src, out = tmp_path / f"{name}.ckpt", tmp_path / f"{name}.out"
        write_original_checkpoint(src, *LOWDIM, n_steps=1, edit_cfg=edit)
        code, _, stderr = convert_in_process(capsys, src, out)
        assert_one_line_error(code, stderr, *needles)
        assert not out.exists() and not marker.exists(), name


# ----------------------------------------------------------------------------- command line
def test_help_and_existing_output(lowdim_original, tmp_path, capsys):
    proc = run_cli(["convert_checkpoint.py", "--help"])
    assert_ok(proc)
    assert "ORIGINAL.ckpt" in proc.stdout and "--overwrite" in proc.stdout and "dill" in proc.stdout
    path, _ = lowdim_original
    out = tmp_path / "exists.ckpt"
    out.write_bytes(b"keep me")
    code, _, stderr = convert_in_process(capsys, path, out)
    assert_one_line_error(code, stderr, "exists.ckpt", "--overwrite")
    assert out.read_bytes() == b"keep me"
    code, _, stderr = convert_in_process(capsys, path, out, "--overwrite")
    assert code == 0, stderr
    assert load_checkpoint_file(out)["state"]["epoch"] == 1


# ----------------------------------------------------------------------------- fine-tune and evaluate
@pytest.mark.needs_data
def test_converted_checkpoint_resumes_training_and_evaluates(pusht_zarr_path, tmp_path):
    steps = 3  # debug=smoke trains 3 steps per epoch: the file is what the original saves after epoch 0
    src = tmp_path / "original.ckpt"
    write_original_checkpoint(src, *LOWDIM, n_steps=steps)
    run_dir = tmp_path / "finetune"
    latest = run_dir / "checkpoints" / "latest.ckpt"
    proc = run_cli(["convert_checkpoint.py", str(src), str(latest)])
    assert_ok(proc)
    converted = tmp_path / "converted.ckpt"
    shutil.copyfile(latest, converted)
    before = load_checkpoint_file(converted)

    proc = train_cli(run_dir, pusht_zarr_path, *LOWDIM[1], "training.resume=True", "training.num_epochs=2")
    assert f"at epoch 1 (global step {steps})" in proc.stdout
    after = load_checkpoint_file(latest)
    assert after["state"]["epoch"] == 2 and after["state"]["global_step"] == 2 * steps
    assert after["state_dicts"]["ema"]["optimization_step"] == 2 * steps
    assert after["state_dicts"]["lr_scheduler"]["last_epoch"] == 2 * steps
    logs = read_json_log(run_dir / "logs.json.txt")
    assert [e["global_step"] for e in logs] == list(range(steps, 2 * steps))
    assert all(math.isfinite(e["train_loss"]) for e in logs)
    changed = [
        k
        for k, v in before["state_dicts"]["model"].items()
        if not torch.equal(v, after["state_dicts"]["model"][k])
    ]
    assert changed, "fine-tuning did not change the weights"

    out = tmp_path / "eval"
    proc = run_cli(["eval.py", "-c", str(converted), "-o", str(out), "-d", "cpu"])
    assert_ok(proc)
    log = json.loads((out / "eval_log.json").read_text())
    assert 0.0 <= log["test/mean_score"] <= 1.0
