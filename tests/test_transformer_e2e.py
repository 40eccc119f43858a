"""DP-T end to end through the command line (CPU, tiny networks): train, evaluate (also on N test seeds with
a confidence interval), resume after SIGKILL, and the original's own DP-T configs, resolved and unresolved."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from diffusion_policy.common.checkpoint_io import load_checkpoint_file
from diffusion_policy.common.json_logger import read_json_log
from tests.helpers import (
    FIXTURES,
    assert_ok,
    assert_one_line_error,
    evaluate_in_process,
    run_cli,
    train_cli,
    trained_run,
)
from tests.resume_check import assert_same_training_state, kill_then_resume

pytestmark = pytest.mark.needs_data

STATE_CFG = "train_diffusion_transformer_lowdim_pusht_workspace"
IMAGE_CFG = "train_diffusion_transformer_hybrid_workspace"
N_EPOCHS = 3
# device and size overrides for the original's configs: everything else stays the original's
SHRINK_RUN = [
    "training.device=cpu",
    "training.num_epochs=1",
    "training.max_train_steps=2",
    "training.max_val_steps=1",
    "dataloader.batch_size=8",
    "dataloader.num_workers=0",
    "val_dataloader.batch_size=8",
    "val_dataloader.num_workers=0",
    "task.dataset.max_train_episodes=2",
    "task.env_runner.n_train=1",
    "task.env_runner.n_train_vis=0",
    "task.env_runner.n_test=1",
    "task.env_runner.n_test_vis=1",
    "task.env_runner.max_steps=16",
    "task.env_runner.n_envs=1",
    "policy.num_inference_steps=2",
]


def state_args(zarr: str, run_dir: Path, *extra: str) -> list[str]:
    return [
        "train.py",
        f"--config-name={STATE_CFG}",
        "debug=smoke_transformer",
        f"task.dataset.zarr_path={zarr}",
        f"training.num_epochs={N_EPOCHS}",
        "training.rollout_every=2",
        "training.checkpoint_every=1",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


@pytest.fixture(scope="module")
def dpt_run(tmp_path_factory, pusht_zarr_path) -> Path:
    return trained_run(tmp_path_factory, "dpt", functools.partial(state_args, pusht_zarr_path))


def test_state_dpt_trains_and_eval_reports_a_confidence_interval(dpt_run, tmp_path):
    payload = load_checkpoint_file(dpt_run / "checkpoints" / "latest.ckpt")
    assert payload["state"]["epoch"] == N_EPOCHS
    assert "TransformerForDiffusion" in payload["cfg_yaml"] and "learning_rate" in payload["cfg_yaml"]
    model = payload["state_dicts"]["model"]
    assert {"model.mask", "model.memory_mask", "model.pos_emb", "model.cond_pos_emb"} <= set(model)
    # the optimizer is the policy's own AdamW with decay / no-decay groups
    groups = payload["state_dicts"]["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    logs = [e for e in read_json_log(dpt_run / "logs.json.txt") if "val_loss" in e]
    assert len(logs) == N_EPOCHS and "test/mean_score" in logs[0]

    out = tmp_path / "eval"
    ckpt = str(dpt_run / "checkpoints" / "latest.ckpt")
    proc = run_cli(["eval.py", "-c", ckpt, "-o", str(out), "-d", "cpu", "--n-test", "3"])
    assert_ok(proc)
    log = json.loads((out / "eval_log.json").read_text())
    assert (log["test/n_episodes"], log["test/first_seed"], log["test/last_seed"]) == (3, 100000, 100002)
    assert not any(k.startswith("train/") for k in log), "--n-test evaluates test seeds only"
    scores = [log[f"test/sim_max_reward_{s}"] for s in (100000, 100001, 100002)]
    assert log["test/mean_score"] == pytest.approx(sum(scores) / 3)
    assert log["test/mean_score_ci95_low"] <= log["test/mean_score"] <= log["test/mean_score_ci95_high"]
    assert 0 <= log["test/success_rate_ci95_low"] <= log["test/success_rate_ci95_high"] <= 1
    assert "95% CI" in proc.stdout and "3 test seeds 100000-100002" in proc.stdout

    proc = run_cli(["eval.py", "-c", ckpt, "-o", str(tmp_path / "bad"), "--n-test", "0"])
    assert_one_line_error(proc, "--n-test=0")
    assert not (tmp_path / "bad").exists()


def test_state_dpt_resume_after_sigkill_ends_with_identical_weights(dpt_run, pusht_zarr_path, tmp_path):
    resumed = kill_then_resume(functools.partial(state_args, pusht_zarr_path), tmp_path / "killed")
    assert_same_training_state(dpt_run / "checkpoints" / "latest.ckpt", resumed)


def test_image_dpt_trains_and_evaluates(pusht_zarr_path, tmp_path):
    run_dir = tmp_path / "image_dpt"
    train_cli(
        run_dir,
        pusht_zarr_path,
        f"--config-name={IMAGE_CFG}",
        "debug=smoke_transformer_image",
        "task.dataset.max_train_episodes=1",
        "dataloader.batch_size=4",
        "val_dataloader.batch_size=4",
    )
    payload = load_checkpoint_file(run_dir / "checkpoints" / "latest.ckpt")
    groups = payload["state_dicts"]["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [1e-3, 0.0, 1e-6], "transformer decay, no decay, encoder"
    out, latest = tmp_path / "image_eval", run_dir / "checkpoints" / "latest.ckpt"
    assert_ok(run_cli(["eval.py", "-c", str(latest), "-o", str(out), "-d", "cpu", "--noise-seed", "0"]))
    log = json.loads((out / "eval_log.json").read_text())
    assert list((out / "media").glob("*.mp4"))
    # with seeded noise an evaluation is reproducible: the same checkpoint evaluated again, in this process
    again = evaluate_in_process(latest, tmp_path / "again", noise_seed=0)
    assert log["test/mean_score"] == again["test/mean_score"]


def test_original_unresolved_state_dpt_config_trains(pusht_zarr_path, tmp_path):
    run_dir = tmp_path / "unresolved"
    train_cli(
        run_dir,
        pusht_zarr_path,
        f"--config-dir={FIXTURES}",
        "--config-name=transformer_lowdim_pusht_unresolved",
        *SHRINK_RUN,
        "policy.model.n_layer=1",
        "policy.model.n_head=2",
        "policy.model.n_emb=16",
    )
    cfg_yaml = load_checkpoint_file(run_dir / "checkpoints" / "latest.ckpt")["cfg_yaml"]
    assert "cond_dim: 20" in cfg_yaml and "pad_after: 7" in cfg_yaml and "eval:" not in cfg_yaml


def test_original_resolved_image_dpt_config_trains(pusht_zarr_path, tmp_path):
    run_dir = tmp_path / "resolved"
    train_cli(
        run_dir,
        pusht_zarr_path,
        f"--config-dir={FIXTURES}",
        "--config-name=transformer_hybrid_pusht_resolved",
        *SHRINK_RUN,
        "dataloader.batch_size=4",
        "val_dataloader.batch_size=4",
        "task.dataset.max_train_episodes=1",
        "policy.n_layer=1",
        "policy.n_head=2",
        "policy.n_emb=16",
    )
    payload = load_checkpoint_file(run_dir / "checkpoints" / "latest.ckpt")
    assert "horizon: 10" in payload["cfg_yaml"]
    assert payload["state_dicts"]["model"]["model.pos_emb"].shape == (1, 10, 16)
