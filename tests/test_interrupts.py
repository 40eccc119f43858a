"""Ctrl-C, SIGTERM and dead workers end a run cleanly, and the run resumes to the same weights (issue 14).

The runs use one data-loader worker and two env worker processes, so that stopping has workers to clean up.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from diffusion_policy.common import shutdown
from diffusion_policy.common.checkpoint_io import load_checkpoint_file
from diffusion_policy.common.errors import RunInterrupted, WorkerDiedError
from diffusion_policy.common.json_logger import read_json_log
from tests.helpers import assert_ok, lowdim_args, run_cli, start_cli
from tests.resume_check import HOLD_EPOCH, start_held, wait_until_held

WITH_WORKERS = ("dataloader.num_workers=1", "task.env_runner.n_envs=2")


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(ppid, state, start time) of a live process, None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text.rsplit(")", 1)[1].split()  # the name in (...) may hold spaces
    return int(fields[1]), fields[0], int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def descendants(root: int) -> dict[int, int]:
    """pid -> start time of every live process below ``root``."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            table[int(entry)] = st
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _, start) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = start
                frontier.append(pid)
    return found


def survivors(processes: dict[int, int], wait_s: float = 120.0) -> list[int]:
    """Those of ``processes`` still running (not gone, not a zombie, not a reused pid); waits for them to
    go, up to ``wait_s`` (a bound against leaks only: processes that exit return at once)."""
    deadline = time.time() + wait_s
    while True:
        alive = []
        for pid, start in processes.items():
            st = _stat(pid)
            if st is not None and st[1] != "Z" and st[2] == start:
                alive.append(pid)
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.1)


def assert_same_final_state(run_dir: Path, reference_dir: Path) -> None:
    got = load_checkpoint_file(run_dir / "checkpoints" / "latest.ckpt")
    ref = load_checkpoint_file(reference_dir / "checkpoints" / "latest.ckpt")
    assert got["state"]["epoch"] == ref["state"]["epoch"]
    assert got["state"]["global_step"] == ref["state"]["global_step"]
    for part in ("model", "ema_model"):
        a, b = ref["state_dicts"][part], got["state_dicts"][part]
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{part}.{k} differs after stop + resume"
    for part in ("ema", "topk_manager"):
        assert got["state_dicts"][part] == ref["state_dicts"][part], part


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, pusht_zarr_path) -> Path:
    run_dir = tmp_path_factory.mktemp("interrupts") / "reference"
    assert_ok(run_cli(lowdim_args(pusht_zarr_path, run_dir, *WITH_WORKERS)))
    return run_dir


@pytest.mark.needs_data
@pytest.mark.parametrize(
    ("sig", "to_group"),
    [(signal.SIGINT, True), (signal.SIGTERM, False)],
    ids=["ctrl-c to the process group", "sigterm to the main process"],
)
def test_stop_signal_leaves_a_resumable_run_and_no_workers(
    sig, to_group, reference_run, pusht_zarr_path, tmp_path
):
    run_dir = tmp_path / "run"
    latest = run_dir / "checkpoints" / "latest.ckpt"
    # held at the start of epoch 2 (epoch 1's checkpoint written, env workers up since epoch 0's rollout)
    proc = start_held(
        lowdim_args(pusht_zarr_path, run_dir, *WITH_WORKERS),
        tmp_path / "hold",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    try:
        wait_until_held(proc, tmp_path / "hold")
        workers = descendants(proc.pid)
        names = {pid: _cmdline(pid)[:80] for pid in workers}
        assert len(workers) >= 4, f"expected resource tracker, fork server, 2 env workers: {names}"
        if to_group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=600)  # against a hang only
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, f"exit {proc.returncode}\n{stderr[-3000:]}"
    lines = [ln for ln in stderr.splitlines() if ln.startswith("interrupted:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert signal.Signals(sig).name in lines[0] and f"hydra.run.dir={run_dir}" in lines[0], lines[0]
    assert not survivors(workers), "worker processes outlived the run"
    stopped_at = load_checkpoint_file(latest)["state"]["epoch"]  # loads: the file is whole
    assert stopped_at == HOLD_EPOCH, "latest.ckpt is the one written before the signal"
    steps = [e["global_step"] for e in read_json_log(run_dir / "logs.json.txt")]
    assert steps == list(range(HOLD_EPOCH * 3)), "no step of the held epoch ran after the signal"

    assert_ok(run_cli(lowdim_args(pusht_zarr_path, run_dir, *WITH_WORKERS)))
    assert_same_final_state(run_dir, reference_run)


@pytest.mark.needs_data
def test_dead_loader_worker_fails_the_run_with_its_cause(pusht_zarr_path, tmp_path):
    run_dir = tmp_path / "run"
    # long epochs (all of 20 episodes' windows, 16 a batch), so the kill lands inside one
    args = lowdim_args(
        pusht_zarr_path,
        run_dir,
        "dataloader.num_workers=1",
        "task.dataset.max_train_episodes=20",
        "training.max_train_steps=null",
    )
    proc = start_cli(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 600  # against a hang only
        loader_workers = []
        while not loader_workers and proc.poll() is None and time.time() < deadline:
            # a forked loader worker runs train.py's command line (unlike multiprocessing's helpers)
            loader_workers = [pid for pid in descendants(proc.pid) if "train.py" in _cmdline(pid)]
            time.sleep(0.01)
        assert loader_workers, "no loader worker appeared"
        os.kill(loader_workers[0], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=600)  # against a hang only
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, f"exit {proc.returncode}\n{stderr[-3000:]}"
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert "data loader worker died during epoch 0" in lines[0] and "SIGKILL" in lines[0], lines[0]


class _KillingPolicy:
    """Returns still actions; at its ``kill_at``-th call kills one env worker (an OOM kill, say)."""

    device = torch.device("cpu")

    def __init__(self, victim_pid: int, kill_at: int):
        self.victim_pid, self.kill_at, self.calls = victim_pid, kill_at, 0

    def reset(self):
        pass

    def predict_action(self, obs):
        self.calls += 1
        if self.calls == self.kill_at:
            victim = {self.victim_pid: _stat(self.victim_pid)[2]}
            os.kill(self.victim_pid, signal.SIGKILL)
            assert not survivors(victim), "SIGKILL did not end it"  # dead before the next env step
        b = obs["obs"].shape[0]
        return {"action": torch.full((b, 8, 2), 256.0)}


def test_dead_env_worker_fails_the_rollout_with_its_cause(tmp_path):
    from diffusion_policy.env_runner.pusht_keypoints_runner import PushTKeypointsRunner

    runner = PushTKeypointsRunner(
        output_dir=str(tmp_path),
        n_train=2,
        n_train_vis=0,
        n_test=2,
        n_test_vis=0,
        legacy_test=True,
        max_steps=64,
        n_obs_steps=2,
        n_action_steps=8,
        n_envs=2,
    )
    try:
        runner.start()
        processes = runner.rollout._vec.processes
        workers = {p.pid: _stat(p.pid)[2] for p in processes}
        victim = processes[1].pid
        with pytest.raises(WorkerDiedError, match=rf"env worker 1 \(pid {victim}\) was killed by SIGKILL"):
            runner.run(_KillingPolicy(victim, kill_at=3))
        assert not survivors(workers), "the other worker outlived the failed rollout"
    finally:
        runner.close()


def wait_for_handler(done) -> None:
    """Python runs a signal handler in the main thread between bytecodes: poll until ``done()``."""
    deadline = time.time() + 120  # against a lost signal only
    while not done():
        assert time.time() < deadline, "the signal handler never ran"
        time.sleep(0.001)


def test_first_signal_asks_second_forces_and_handlers_come_back():
    before = signal.getsignal(signal.SIGINT)
    with shutdown.stop_signals_handled():
        shutdown.raise_if_requested()  # nothing yet
        os.kill(os.getpid(), signal.SIGINT)
        wait_for_handler(lambda: shutdown.requested() is not None)
        assert shutdown.requested() == signal.SIGINT
        with pytest.raises(RunInterrupted) as stop:
            shutdown.raise_if_requested()
        assert stop.value.exit_code == 130 and not stop.value.forced
        with pytest.raises(RunInterrupted) as forced:
            os.kill(os.getpid(), signal.SIGTERM)
            wait_for_handler(lambda: False)  # the handler raises out of the wait
        assert forced.value.forced
    assert signal.getsignal(signal.SIGINT) is before and shutdown.requested() is None
    with shutdown.stop_signals_handled():
        # data-parallel ranks stop together: another rank's signal stops this one too
        shutdown.raise_if_requested(sync=lambda flag: flag)
        with pytest.raises(RunInterrupted):
            shutdown.raise_if_requested(sync=lambda flag: True)
