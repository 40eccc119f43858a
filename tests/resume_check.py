"""Kill a training run mid-way with SIGKILL and check that resuming it reproduces an uninterrupted run
exactly; shared by the end-to-end tests of every policy family."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from diffusion_policy.common.checkpoint_io import load_checkpoint_file


def sigkill_after_first_checkpoint(args: list[str], run_dir: Path, cwd: Path, env: dict) -> int:
    """Start ``python *args``, SIGKILL it once ``latest.ckpt`` exists; returns the checkpoint's epoch."""
    latest = run_dir / "checkpoints" / "latest.ckpt"
    proc = subprocess.Popen(
        [sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 180
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return int(load_checkpoint_file(latest)["state"]["epoch"])


def assert_same_training_state(reference_ckpt: Path, resumed_ckpt: Path) -> None:
    """Model, EMA model and counters, optimizer moments, LR schedule and top-k bookkeeping all equal."""
    reference, resumed = load_checkpoint_file(reference_ckpt), load_checkpoint_file(resumed_ckpt)
    assert resumed["state"]["epoch"] == reference["state"]["epoch"]
    ref_sd, got_sd = reference["state_dicts"], resumed["state_dicts"]
    for part in ("model", "ema_model"):
        ref, got = ref_sd[part], got_sd[part]
        assert ref.keys() == got.keys()
        for k in ref:
            assert torch.equal(ref[k], got[k]), f"{part}.{k} differs after kill + resume"
    assert got_sd["ema"] == ref_sd["ema"]
    for k, state in ref_sd["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg"], got_sd["optimizer"]["state"][k]["exp_avg"])
    assert got_sd["lr_scheduler"]["last_epoch"] == ref_sd["lr_scheduler"]["last_epoch"]
    assert got_sd["topk_manager"] == ref_sd["topk_manager"]
