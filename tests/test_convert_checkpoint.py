"""convert_checkpoint.py: checkpoints written the original's way (dill + torch.save) open safely and convert
into checkpoints that evaluate, plan and resume training like native ones (CPU, tiny networks).

The fixtures cannot run the original code; they are written the way its ``BaseWorkspace.save_checkpoint``
writes (same payload layout, a resolved Hydra ``DictConfig`` with its ``${now:}`` resolver cache,
``state_dict()``s copied to CPU as its saving thread does, ``dill.dumps`` counters) from this framework's own
policies, whose parameter names, shapes and math are the original's.
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

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "config"
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "WANDB_MODE": "disabled",
    "WANDB_SILENT": "true",
    "SDL_VIDEODRIVER": "dummy",
    "SDL_AUDIODRIVER": "dummy",
}
ENV.pop("HYDRA_FULL_ERROR", None)

# Every PushT policy type: (config name, tiny-size overrides). Adding a policy type is one line here.
POLICY_CONFIGS = [
    ("train_diffusion_unet_lowdim_workspace", ["debug=smoke"]),
    ("train_diffusion_unet_hybrid_workspace", ["debug=smoke_image"]),
    ("train_diffusion_unet_image_workspace", ["debug=smoke_image"]),
    ("train_diffusion_transformer_lowdim_pusht_workspace", ["debug=smoke_transformer"]),
    ("train_diffusion_transformer_hybrid_workspace", ["debug=smoke_transformer_image"]),
]
LOWDIM = POLICY_CONFIGS[0]

register_resolvers()


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # tiny networks on a shared 2-core CI machine: a second intra-op thread only adds contention
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    workspace.model.train()
    for batch in batches:
        loss = workspace.model.compute_loss(batch)
        loss.backward()
        workspace.optimizer.step()
        workspace.optimizer.zero_grad()
        lr_scheduler.step()
        ema.step(workspace.model)
    # saved before the end-of-epoch increments: epoch index 0, global_step = steps done - 1
    epoch, global_step = 0, n_steps - 1
    if edit_cfg is not None:
        with open_dict(cfg):
            edit_cfg(cfg)
    payload = {
        "cfg": cfg,
        "state_dicts": {
            name: _copy_to_cpu(getattr(workspace, name).state_dict())
            for name in ("model", "ema_model", "optimizer")
        },
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


def run_cli(args: list[str], timeout: float = 240, prelude: str = "") -> subprocess.CompletedProcess:
    cmd = [sys.executable, *args]
    if prelude:  # run a script after some Python setup, e.g. making `import dill` fail
        script, rest = args[0], args[1:]
        code = (
            f"{prelude}; import runpy, sys; sys.argv = {[script, *rest]!r}; "
            f"runpy.run_path({script!r}, run_name='__main__')"
        )
        cmd = [sys.executable, "-c", code]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def assert_one_line_error(code: int, stderr: str, *needles: str) -> str:
    assert code == 2, stderr
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, f"expected one 'error:' line, stderr was:\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _convert_main():
    import importlib.util

    spec = importlib.util.spec_from_file_location("dp_convert_cli", REPO_ROOT / "convert_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


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
    source_opt = run.workspace.optimizer.state_dict()
    for got_group, want_group in zip(
        sd["optimizer"]["param_groups"], source_opt["param_groups"], strict=True
    ):
        for key in ("params", "lr", "initial_lr", "weight_decay", "betas"):
            assert got_group[key] == want_group[key], key
    for i, state in source_opt["state"].items():
        for k, v in state.items():
            assert torch.equal(torch.as_tensor(sd["optimizer"]["state"][i][k]), torch.as_tensor(v)), k
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

    proc = run_cli(
        [
            "train.py",
            *LOWDIM[1],
            f"task.dataset.zarr_path={pusht_zarr_path}",
            f"hydra.run.dir={run_dir}",
            "training.resume=True",
            "training.num_epochs=2",
        ]
    )
    assert_ok(proc)
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
