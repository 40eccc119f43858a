"""Kill a training run mid-way with SIGKILL and check that resuming it reproduces an uninterrupted run
exactly; shared by the end-to-end tests of every policy family. The run is held at a known epoch
(``diffusion_policy.common.hold_point``) so that the kill never races it, however loaded the machine."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from diffusion_policy.common.checkpoint_io import load_checkpoint_file
from diffusion_policy.common.hold_point import HOLD_AT_EPOCH, HOLD_DIR, held_marker
from tests.helpers import ENV, assert_ok, run_cli, start_cli

HOLD_EPOCH = 2  # of the 4-epoch runs: after a checkpoint epoch without a rollout (1) and one with (0)


def start_held(args: list[str], hold_dir: Path, epoch: int = HOLD_EPOCH, **popen) -> subprocess.Popen:
    """Start ``python *args`` told to hold at the start of ``epoch`` (``common.hold_point``)."""
    hold_dir.mkdir(parents=True, exist_ok=True)
    return start_cli(args, env={**ENV, HOLD_AT_EPOCH: str(epoch), HOLD_DIR: str(hold_dir)}, **popen)


def wait_until_held(proc: subprocess.Popen, hold_dir: Path, epoch: int = HOLD_EPOCH) -> None:
    """Block until the run says it is held at ``epoch``; fails if it exits first."""
    marker = held_marker(hold_dir, epoch)
    deadline = time.time() + 900  # only against a hung run: the handshake, not this, decides when to act
    while not marker.exists():
        assert proc.poll() is None, f"the run exited ({proc.returncode}) before reaching epoch {epoch}"
        assert time.time() < deadline, f"the run never reached epoch {epoch}"
        time.sleep(0.02)


def sigkill_while_held(args: list[str], run_dir: Path, epoch: int = HOLD_EPOCH) -> int:
    """Run ``python *args``, SIGKILL it while it is held at ``epoch``; returns the epoch of its
    ``latest.ckpt`` (``epoch``: the checkpoint of the epoch before was written)."""
    hold_dir = run_dir.parent / f"{run_dir.name}_hold"
    proc = start_held(args, hold_dir, epoch, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_held(proc, hold_dir, epoch)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return int(load_checkpoint_file(run_dir / "checkpoints" / "latest.ckpt")["state"]["epoch"])


def kill_then_resume(args_for: Callable[..., list[str]], run_dir: Path, epoch: int = HOLD_EPOCH) -> Path:
    """SIGKILLs the run ``python *args_for(run_dir)`` while held at ``epoch``, resumes it to its end with
    ``args_for(run_dir, "training.resume=True")``; its latest checkpoint."""
    killed_at = sigkill_while_held(args_for(run_dir), run_dir, epoch)
    assert killed_at == epoch, "killed while held, after the previous epoch's checkpoint"
    assert_ok(run_cli(args_for(run_dir, "training.resume=True")))
    return run_dir / "checkpoints" / "latest.ckpt"


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
