"""End to end through the command line: train.py / eval.py / torchrun, on CPU with tiny networks.

One state-based run (module fixture) is shared by the eval, resume and bad-checkpoint tests.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from diffusion_policy.common.checkpoint_io import load_checkpoint_file, save_checkpoint_file
from diffusion_policy.common.json_logger import read_json_log
from tests.helpers import (
    ENV,
    FIXTURES,
    N_EPOCHS,
    REPO_ROOT,
    assert_ok,
    assert_one_line_error,
    evaluate_in_process,
    load_script,
    lowdim_args,
    run_cli,
    run_clis_side_by_side,
    train_cli,
    trained_run,
)


def model_state(path: Path) -> dict:
    return load_checkpoint_file(path)["state_dicts"]


@pytest.fixture(scope="module")
def lowdim_run(tmp_path_factory, pusht_zarr_path) -> Path:
    return trained_run(tmp_path_factory, "lowdim", functools.partial(lowdim_args, pusht_zarr_path))


# ----------------------------------------------------------------------------- state training + eval
@pytest.mark.needs_data
def test_state_training_leaves_checkpoints_logs_and_videos(lowdim_run):
    ckpt_dir = lowdim_run / "checkpoints"
    payload = load_checkpoint_file(ckpt_dir / "latest.ckpt")
    assert payload["state"]["epoch"] == N_EPOCHS and payload["state"]["global_step"] == N_EPOCHS * 3
    assert payload["state_dicts"]["ema"]["optimization_step"] == N_EPOCHS * 3, "EMA step is checkpointed"
    assert {"model", "ema_model", "optimizer", "lr_scheduler", "topk_manager"} <= set(payload["state_dicts"])
    assert "pad_before: 1" in payload["cfg_yaml"] and "${" not in payload["cfg_yaml"]
    topk = sorted(p.name for p in ckpt_dir.glob("epoch=*.ckpt"))
    assert [name[:10] for name in topk] == ["epoch=0000", "epoch=0002", "epoch=0003"]
    logs = read_json_log(lowdim_run / "logs.json.txt")
    assert [e["global_step"] for e in logs] == list(range(N_EPOCHS * 3))
    epoch_ends = [e for e in logs if "val_loss" in e]
    assert len(epoch_ends) == N_EPOCHS
    assert all(k in epoch_ends[0] for k in ("test/mean_score", "train_action_mse_error", "time/rollout_s"))
    assert "test/mean_score" not in epoch_ends[1]
    assert list((lowdim_run / "media").glob("*.mp4"))


@pytest.mark.needs_data
def test_eval_rebuilds_policy_and_runner_from_checkpoint(lowdim_run, tmp_path):
    out = tmp_path / "eval"
    ckpt = lowdim_run / "checkpoints" / "latest.ckpt"
    proc = run_cli(["eval.py", "-c", str(ckpt), "-o", str(out), "-d", "cpu", "--noise-seed", "0"])
    assert_ok(proc)
    log = json.loads((out / "eval_log.json").read_text())
    # with seeded noise an evaluation is reproducible: the same checkpoint evaluated again, in this process
    expected = evaluate_in_process(ckpt, tmp_path / "again", noise_seed=0)
    assert log["test/mean_score"] == expected["test/mean_score"]
    assert {k: v for k, v in log.items() if "max_reward" in k} == {
        k: v for k, v in expected.items() if "max_reward" in k
    }
    videos = [v for k, v in log.items() if "sim_video" in k]
    assert videos and all(Path(v).is_file() and Path(v).is_relative_to(out) for v in videos)
    # a non-empty output dir is refused without prompting, and left untouched
    before = (out / "eval_log.json").read_bytes()
    proc = run_cli(["eval.py", "-c", str(lowdim_run / "checkpoints" / "latest.ckpt"), "-o", str(out)])
    assert_one_line_error(proc, "not empty", "--overwrite")
    assert (out / "eval_log.json").read_bytes() == before


@pytest.mark.needs_data
def test_load_policy_drives_an_env_through_select_action(lowdim_run):
    import numpy as np

    from diffusion_policy.env.pusht.pusht_keypoints_env import PushTKeypointsEnv
    from diffusion_policy.workspace.base_workspace import load_policy

    policy, cfg = load_policy(lowdim_run / "checkpoints" / "latest.ckpt", "cpu")
    assert not policy.training
    n_plans = 0
    predict = policy.predict_action

    def counting_predict(*args, **kwargs):
        nonlocal n_plans
        n_plans += 1
        return predict(*args, **kwargs)

    policy.predict_action = counting_predict
    env = PushTKeypointsEnv(legacy=True, render_mode=None)
    obs, _ = env.reset(seed=100000)
    policy.reset()
    n_steps = cfg.n_action_steps + 1
    for _ in range(n_steps):
        action = policy.select_action(obs[: cfg.obs_dim].astype(np.float32))
        assert action.shape == (cfg.action_dim,)
        obs, reward, terminated, truncated, info = env.step(action.numpy().astype(np.float64))
        assert 0.0 <= reward <= 1.0
    # one plan per n_action_steps env steps
    assert n_plans == 2


@pytest.mark.needs_data
def test_eval_with_another_sampler(lowdim_run, tmp_path):
    ckpt = str(lowdim_run / "checkpoints" / "latest.ckpt")
    trained_with = load_checkpoint_file(ckpt)["cfg_yaml"]
    assert "DDPMScheduler" in trained_with
    out = tmp_path / "ddim"
    assert_ok(
        run_cli(
            [
                "eval.py",
                "-c",
                ckpt,
                "-o",
                str(out),
                "-d",
                "cpu",
                "--sampler",
                "ddim",
                "--inference-steps",
                "2",
                "--noise-seed",
                "1",
            ]
        )
    )
    log = json.loads((out / "eval_log.json").read_text())
    assert log["eval/sampler"] == "DDIMScheduler-2"
    expected = evaluate_in_process(ckpt, tmp_path / "again", sampler="ddim", inference_steps=2, noise_seed=1)
    assert expected["eval/sampler"] == "DDIMScheduler-2"
    assert log["test/mean_score"] == expected["test/mean_score"]
    bad = tmp_path / "bad"
    proc = run_cli(["eval.py", "-c", ckpt, "-o", str(bad), "--inference-steps", "1000"])
    assert_one_line_error(proc, "--inference-steps", "num_inference_steps=1000")
    assert not bad.exists(), "a refused evaluation leaves no output directory"


@pytest.mark.needs_data
def test_speedups_benchmark_compares_eval_and_loader_variants(lowdim_run):
    """benchmarks.speedups on a real checkpoint: every variant runs and counts what it sampled."""
    proc = run_cli(
        [
            "-m",
            "benchmarks.speedups",
            str(lowdim_run / "checkpoints" / "latest.ckpt"),
            "--device",
            "cpu",
            "--loader-steps",
            "4",
        ]
    )
    assert_ok(proc)
    rows = {r["name"]: r for r in map(json.loads, proc.stdout.splitlines())}
    evals = ["shipped", "keep_finished", "per_episode", "ddpm100"]
    assert list(rows) == [f"eval.{v}.wall_time" for v in evals] + [
        f"loader.workers{w}.optimizer_steps_per_s" for w in (0, 1)
    ]
    assert all(r["value"] > 0 and r["hardware"] for r in rows.values())
    ev = {v: rows[f"eval.{v}.wall_time"]["config"] for v in evals}
    n_episodes = ev["shipped"]["episodes"]
    # the original's way samples every episode at every call, finished or not
    assert ev["keep_finished"]["sampled_rows"] == ev["keep_finished"]["policy_calls"] * n_episodes
    assert ev["shipped"]["sampled_rows"] <= ev["shipped"]["policy_calls"] * n_episodes
    assert ev["per_episode"]["policy_calls"] == ev["per_episode"]["sampled_rows"] >= n_episodes
    assert ev["ddpm100"]["sampler"] == "DDPMScheduler-100" and ev["shipped"]["speedup"] == 1.0
    loader = rows["loader.workers1.optimizer_steps_per_s"]["config"]
    assert loader["num_workers"] == 1 and loader["steps"] == 4 and loader["epochs_started"] >= 1
    # bad input: one clear line, no traceback
    proc = run_cli(["-m", "benchmarks.speedups", str(lowdim_run / "missing.ckpt")])
    assert proc.returncode != 0 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_eval_help_does_not_need_input():
    proc = run_cli(["eval.py", "--help"])
    assert_ok(proc)
    assert "--checkpoint" in proc.stdout and "--overwrite" in proc.stdout


# ----------------------------------------------------------------------------- resume
@pytest.mark.needs_data
def test_resume_after_sigkill_ends_with_identical_weights(lowdim_run, pusht_zarr_path, tmp_path):
    from tests.resume_check import assert_same_training_state, kill_then_resume

    run_dir = tmp_path / "killed"
    latest = kill_then_resume(functools.partial(lowdim_args, pusht_zarr_path), run_dir)
    assert load_checkpoint_file(latest)["state"]["epoch"] == N_EPOCHS, (
        "resume trains to num_epochs in total, not num_epochs more"
    )
    assert_same_training_state(lowdim_run / "checkpoints" / "latest.ckpt", latest)
    steps = [e["global_step"] for e in read_json_log(run_dir / "logs.json.txt")]
    assert steps == list(range(N_EPOCHS * 3)), "redone steps must not appear twice in logs.json.txt"


# ----------------------------------------------------------------------------- published / original configs
@pytest.mark.needs_data
def test_published_style_image_config_runs_and_evaluates(pusht_zarr_path, tmp_path):
    run_dir = tmp_path / "image"
    env = {k: v for k, v in ENV.items() if k != "WANDB_MODE"}  # the config asks for online W&B
    env["WANDB_API_KEY"] = ""
    env["WANDB_CONFIG_DIR"] = str(tmp_path / "wandb_config")
    proc = train_cli(
        run_dir,
        pusht_zarr_path,
        f"--config-dir={FIXTURES}",
        "--config-name=image_pusht_published_tiny",
        "training.device=cpu",
        env=env,
    )
    assert "no W&B credentials" in proc.stdout + proc.stderr
    assert list((run_dir / "wandb").glob("offline-run-*")), "online without credentials falls back to offline"
    assert (run_dir / "checkpoints" / "latest.ckpt").is_file()
    out = tmp_path / "image_eval"
    assert_ok(
        run_cli(["eval.py", "-c", str(run_dir / "checkpoints" / "latest.ckpt"), "-o", str(out), "-d", "cpu"])
    )
    log = json.loads((out / "eval_log.json").read_text())
    assert "test/mean_score" in log and list((out / "media").glob("*.mp4"))


@pytest.mark.needs_data
def test_unresolved_original_config_with_eval_resolver_runs(pusht_zarr_path, tmp_path):
    run_dir = tmp_path / "unresolved"
    train_cli(
        run_dir,
        pusht_zarr_path,
        f"--config-dir={FIXTURES}",
        "--config-name=lowdim_unresolved_eval",
        "training.device=cpu",
    )
    cfg_yaml = load_checkpoint_file(run_dir / "checkpoints" / "latest.ckpt")["cfg_yaml"]
    assert "global_cond_dim: 40" in cfg_yaml and "pad_after: 7" in cfg_yaml and "eval:" not in cfg_yaml


# ----------------------------------------------------------------------------- sweeps and DDP
@pytest.mark.needs_data
@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_multirun_seed_sweep(launcher, pusht_zarr_path, tmp_path):
    sweep_dir = tmp_path / f"sweep_{launcher}"
    args = [
        "train.py",
        "-m",
        "debug=smoke",
        "training.seed=1,2",
        "training.num_epochs=1",
        f"task.dataset.zarr_path={pusht_zarr_path}",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    if launcher == "joblib":
        args += ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    assert_ok(run_cli(args))
    weights = [model_state(sweep_dir / str(i) / "checkpoints" / "latest.ckpt")["model"] for i in (0, 1)]
    key = next(k for k in weights[0] if k.endswith("weight") and weights[0][k].numel() > 1)
    assert not torch.equal(weights[0][key], weights[1][key]), "different seeds must give different runs"


@pytest.mark.needs_data
def test_torchrun_two_process_gloo(pusht_zarr_path, tmp_path):
    run_dir = tmp_path / "ddp"
    proc = run_cli(
        [
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "train.py",
            "debug=smoke",
            "training.num_epochs=1",
            f"task.dataset.zarr_path={pusht_zarr_path}",
            f"hydra.run.dir={run_dir}",
        ]
    )
    assert_ok(proc)
    logs = read_json_log(run_dir / "logs.json.txt")
    assert [e["global_step"] for e in logs] == [0, 1, 2], "only rank 0 logs"
    assert len(list((run_dir / "media").glob("*.mp4"))) == 2, "only rank 0 rolls out"
    assert (run_dir / "checkpoints" / "latest.ckpt").is_file()


def _ddp_worker(rank: int, port: int, queue) -> None:
    import torch.distributed as dist
    from torch import nn

    from diffusion_policy.common.distributed import DistInfo, wrap_for_training

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 1, bias=False)
            self.marker = nn.Parameter(torch.empty(0))  # like ModuleAttrMixin's device marker

        def compute_loss(self, batch):
            return self.lin(batch["x"]).sum()

    torch.manual_seed(0)
    policy = Tiny()
    module = wrap_for_training(policy, DistInfo(rank=rank, world_size=2), torch.device("cpu"))
    module({"x": torch.full((1, 2), float(rank + 1))}).backward()  # rank 0 grad 1, rank 1 grad 2
    queue.put((rank, policy.lin.weight.grad.flatten().tolist()))
    dist.destroy_process_group()


def test_ddp_wrapper_averages_gradients():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    grads = dict(queue.get(timeout=600) for _ in range(2))  # against a hang only
    for p in procs:
        p.join(timeout=600)
        assert p.exitcode == 0
    assert grads[0] == [1.5, 1.5] and grads[1] == grads[0], grads


# ----------------------------------------------------------------------------- bad input
@pytest.mark.needs_data
def test_bad_inputs_give_one_line_errors(lowdim_run, pusht_zarr_path, tmp_path):
    import zarr

    fresh = tmp_path / "fresh"
    cases = {
        "missing dataset": (
            ["train.py", "debug=smoke", "task.dataset.zarr_path=/nonexistent/pusht.zarr"],
            ["/nonexistent/pusht.zarr", "pusht.zip"],
        ),
        "unknown group option": (["train.py", "task=pusht_nope"], ["task/pusht_nope", "pusht_lowdim"]),
        "unknown key": (["train.py", "training.lerning_rate=1"], ["training.lerning_rate"]),
        "shape_meta mismatch": (
            ["train.py", "debug=smoke", "task.obs_dim=21", f"task.dataset.zarr_path={pusht_zarr_path}"],
            ["shape", "[20]", "[21]"],
        ),
    }
    if not torch.cuda.is_available():
        cases["cuda without gpu"] = (["train.py", "debug=smoke", "training.device=cuda:0"], ["CUDA", "cpu"])
    bad_zarr = tmp_path / "bad.zarr"
    group = zarr.open_group(str(bad_zarr), mode="w")
    group.create_group("data")
    group.create_group("meta")
    cases["wrong zarr layout"] = (
        ["train.py", "debug=smoke", f"task.dataset.zarr_path={bad_zarr}"],
        ["bad.zarr"],
    )
    # an existing run is never silently restarted over
    existing = fresh / "existing_run"
    shutil.copytree(
        lowdim_run, existing, ignore=shutil.ignore_patterns("media", "wandb", ".hydra", "train.log")
    )
    before = {p: p.read_bytes() for p in existing.rglob("*") if p.is_file()}
    cases["restart over an existing run"] = (
        lowdim_args(pusht_zarr_path, None, "training.resume=False"),
        ["already holds", "training.resume=True"],
    )
    run_dirs = {
        name: existing if name.startswith("restart") else fresh / name.replace(" ", "_") for name in cases
    }
    results = run_clis_side_by_side(
        {name: [*args, f"hydra.run.dir={run_dirs[name]}"] for name, (args, _) in cases.items()}
    )
    for name, result in results.items():
        assert_one_line_error(result, *cases[name][1])
        if name.startswith("restart"):
            assert all(p.read_bytes() == data for p, data in before.items()), (
                "an existing run was overwritten"
            )
            continue
        run_dir = fresh / name.replace(" ", "_")
        assert not (run_dir / "checkpoints").exists() and not (run_dir / "logs.json.txt").exists(), name


@pytest.mark.needs_data
def test_bad_checkpoints_give_one_line_errors_and_overwrite_nothing(
    lowdim_run, pusht_zarr_path, tmp_path, capsys
):
    latest = lowdim_run / "checkpoints" / "latest.ckpt"
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(latest.read_bytes()[:4096])
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"cfg": "x", "state_dicts": {}}, foreign)
    mismatched = tmp_path / "mismatched.ckpt"
    payload = load_checkpoint_file(latest)
    cfg = OmegaConf.create(payload["cfg_yaml"])
    cfg.policy.model.down_dims = [16, 64]  # the code would now build a different network
    payload["cfg_yaml"] = OmegaConf.to_yaml(cfg)
    save_checkpoint_file({k: payload[k] for k in ("cfg_yaml", "state_dicts", "state")}, mismatched)
    out = tmp_path / "eval_truncated"
    proc = run_cli(["eval.py", "-c", str(truncated), "-o", str(out), "-d", "cpu"])
    assert_one_line_error(proc, truncated.name, "truncated")
    assert not out.exists()
    # the same entry point in-process (torch is already imported here, which saves a process start each)
    eval_main = load_script(REPO_ROOT / "eval.py", "dp_eval_cli").main
    for ckpt, needle in [(foreign, "not a diffusion_policy"), (mismatched, "does not match")]:
        out = tmp_path / f"eval_{ckpt.stem}"
        capsys.readouterr()
        code = eval_main(["-c", str(ckpt), "-o", str(out), "-d", "cpu"])
        err = capsys.readouterr().err
        assert_one_line_error(subprocess.CompletedProcess([], code, "", err), ckpt.name, needle)
        assert not out.exists()

    # resuming from a corrupt latest.ckpt fails before touching the run dir
    run_dir = tmp_path / "corrupt_run"
    shutil.copytree(lowdim_run, run_dir, ignore=shutil.ignore_patterns("media", "wandb"))
    (run_dir / "checkpoints" / "latest.ckpt").write_bytes(truncated.read_bytes())
    # (Hydra itself rewrites .hydra/ and appends to train.log on every launch, as in the original)
    before = {
        p: p.read_bytes()
        for p in run_dir.rglob("*")
        if p.is_file() and ".hydra" not in p.parts and p.name != "train.log"
    }
    proc = run_cli(lowdim_args(pusht_zarr_path, run_dir, "training.resume=True"))
    assert_one_line_error(proc, "latest.ckpt")
    assert all(p.read_bytes() == data for p, data in before.items()), "a failed resume overwrote files"
