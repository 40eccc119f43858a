"""Sweeps on real engines (Ray, SLURM through submitit, joblib, submitit_local) and their live table.

Every engine is real and local (127.0.0.1): one Ray cluster started with ``ray start`` and one
single-node SLURM (started by ``.ci/run`` through ``.ci/start_slurm.sh``) are shared by the whole session.
Waiting is done on handshakes (a checkpoint file appearing, a job state), never on a fixed sleep.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from diffusion_policy.common import aggregate_metrics as am
from diffusion_policy.common.checkpoint_io import load_checkpoint_file
from diffusion_policy.common.config_resolvers import register_resolvers
from diffusion_policy.common.hold_point import HOLD_AT_EPOCH, HOLD_DIR, held_marker
from diffusion_policy.common.sweep_metrics import (
    TABLE_JSON,
    TABLE_MD,
    render_markdown,
    sweep_table,
)
from diffusion_policy.common.sweep_metrics import (
    main as sweep_metrics_main,
)
from tests.helpers import ENV, REPO_ROOT, assert_ok, run_cli
from tests.resume_check import assert_same_training_state

CONFIG_DIR = REPO_ROOT / "config"
BIN = Path(sys.executable).parent
# Ray on loopback only: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps 127.0.0.1 as the node address (otherwise
# Ray swaps it for the machine's outward IP); no token prompt, no usage reporting
RAY_ENV = {
    **ENV,
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}
register_resolvers()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smoke_sweep(zarr: str, sweep_dir: Path, *extra: str) -> list[str]:
    return [
        "train.py",
        "-m",
        "debug=smoke",
        f"task.dataset.zarr_path={zarr}",
        f"hydra.sweep.dir={sweep_dir}",
        *extra,
    ]


def table_of(sweep_dir: Path) -> dict:
    return json.loads((sweep_dir / TABLE_JSON).read_text())


def assert_table_is_the_library_on_the_logs(sweep_dir: Path, jobs: list[str]) -> dict:
    """The sweep's one group equals ``aggregate_metrics`` on the same logs, in-process and through
    ``python -m benchmarks.aggregate_metrics``; the watch command prints the same table."""
    table = table_of(sweep_dir)
    assert table["final"] and [len(g["jobs"]) for g in table["groups"]] == [len(jobs)]
    group = table["groups"][0]
    expected = am.aggregate([am.run_metrics(am.load_log(sweep_dir / j / "logs.json.txt")) for j in jobs])
    assert group["aggregate"] == json.loads(json.dumps(expected))
    proc = run_cli(["-m", "benchmarks.aggregate_metrics", *(str(sweep_dir / j) for j in jobs), "--json"])
    assert_ok(proc)
    assert json.loads(proc.stdout.split("\n", 1)[1])["aggregate"] == group["aggregate"]
    md = (sweep_dir / TABLE_MD).read_text()
    proc = run_cli(["-m", "diffusion_policy.common.sweep_metrics", str(sweep_dir)])
    assert_ok(proc)
    rows = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert rows and rows == [ln for ln in proc.stdout.splitlines() if ln.startswith("|")]
    return table


# ----------------------------------------------------------------------------- table, without engines
def _fake_job(sweep_dir: Path, job: str, overrides: list[str], scores: list[float] | None, status=None):
    d = sweep_dir / job
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if scores is not None:
        lines = [
            {"epoch": i, "global_step": i, "train_loss": 1.0 / (i + 1), "test/mean_score": s}
            for i, s in enumerate(scores)
        ]
        (d / "logs.json.txt").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if status is not None:
        (d / "job_status.json").write_text(json.dumps(status))


def test_table_groups_seeds_names_failures_and_gives_t_intervals(tmp_path):
    sweep = tmp_path / "sweep"
    done = {"status": "completed", "reason": None}
    _fake_job(sweep, "0", ["debug=smoke", "lr=1", "training.seed=1"], [0.2, 0.4], done)
    _fake_job(sweep, "1", ["debug=smoke", "lr=1", "training.seed=2"], [0.6, 0.5], done)
    _fake_job(sweep, "2", ["debug=smoke", "lr=1", "training.seed=3"], [0.1])  # still running
    _fake_job(sweep, "10", ["debug=smoke", "lr=2", "training.seed=1"], [0.9], done)
    bad = {"status": "failed", "reason": "training.num_epochs=-1 is not allowed"}
    _fake_job(sweep, "11", ["debug=smoke", "lr=2", "training.seed=2"], None, bad)
    table = sweep_table(sweep)
    assert table["common_overrides"] == ["debug=smoke"]
    g1, g2 = table["groups"]
    assert (g1["label"], g2["label"]) == ("lr=1", "lr=2")
    assert [j["job"] for j in g1["jobs"]] == ["0", "1", "2"]
    assert g1["counts"] == {"completed": 2, "running": 1, "failed": 0, "no result": 0}
    assert g1["aggregate"]["seeds"] == 3 and g1["aggregate"]["max"] == pytest.approx((0.4 + 0.6 + 0.1) / 3)
    # Student's t with 2 degrees of freedom: 4.303 * sd / sqrt(3)
    maxes = [0.4, 0.6, 0.1]
    mu = sum(maxes) / 3
    sd = (sum((m - mu) ** 2 for m in maxes) / 2) ** 0.5
    assert g1["aggregate"]["max_ci95"] == pytest.approx([mu - 4.303 * sd / 3**0.5, mu + 4.303 * sd / 3**0.5])
    assert g2["aggregate"]["seeds"] == 1 and g2["aggregate"]["max_ci95"] is None
    assert table["failed"] == [
        {"job": "11", "overrides": ["debug=smoke", "lr=2", "training.seed=2"], "status": "failed", **bad}
    ]
    md = render_markdown(table)
    assert "| lr=1 | 3 | 2 / 1 / 0 |" in md and "job 11" in md and bad["reason"] in md
    # once the sweep is over, a job that never reported is named too
    final = sweep_table(sweep, final=True)
    assert [f["job"] for f in final["failed"]] == ["2", "11"] and "rerun the sweep" in final["failed"][0][
        "reason"
    ]


def test_watch_command_help_and_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        sweep_metrics_main(["--help"])
    assert e.value.code == 0 and "training.seed" in capsys.readouterr().out
    assert sweep_metrics_main([str(tmp_path / "missing")]) == 2
    assert "no sweep directory" in capsys.readouterr().err
    assert sweep_metrics_main([str(tmp_path)]) == 2
    assert "no sweep jobs" in capsys.readouterr().err


@pytest.mark.parametrize("launcher", ["ray", "submitit_slurm", "submitit_local"])
@pytest.mark.parametrize(
    "root",
    sorted(p.stem for p in CONFIG_DIR.glob("train_*.yaml")),  # every root config
)
def test_launcher_choices_compose_from_root_configs(launcher, root):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(
            config_name=root,
            overrides=[f"hydra/launcher={launcher}", "training.device=cuda:1"],
            return_hydra_config=True,
        )
    node = cfg.hydra.launcher
    assert node._target_.startswith("hydra_plugins.")
    assert cfg.hydra.callbacks.sweep_metrics._target_.endswith("SweepMetricsCallback")
    if launcher == "ray":
        assert "object_store_memory" in node.ray.init and node.ray.init.object_store_memory is None
        assert node.ray.remote.num_gpus == 1 and node.ray.remote.num_cpus == 1
    else:
        assert node.gpus_per_node == 1 and node.timeout_min == 1440
    if launcher == "submitit_slurm":
        assert node.max_num_timeout == 3 and node.additional_parameters.requeue is True


# ----------------------------------------------------------------------------- Ray
def _stop_with_parent() -> None:
    """In the child: receive SIGTERM when pytest dies (Linux), so a killed test run leaves no cluster."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A real Ray cluster (``ray start --head``) on 127.0.0.1, stopped at the end even if a test failed."""
    ray_bin = BIN / "ray"
    if not ray_bin.exists():
        pytest.fail(f'{ray_bin} not found: install the cluster extra, pip install -e ".[cluster]"')
    port = _free_port()
    log = tmp_path_factory.mktemp("ray") / "ray_start.log"
    args = [str(ray_bin), "start", "--head", "--block", f"--port={port}", "--num-cpus=2"]
    args += ["--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats"]
    proc = subprocess.Popen(
        args,
        cwd=REPO_ROOT,
        env=RAY_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the teardown ends every process it started
        preexec_fn=_stop_with_parent,
    )
    seen = []
    try:
        for line in proc.stdout:  # handshake: `ray start` says so once the head node is up
            seen.append(line)
            if "Ray runtime started" in line:
                break
        else:
            pytest.fail(f"ray start exited with {proc.wait()}:\n{''.join(seen)[-3000:]}")
        # keep draining its output so it never blocks on a full pipe
        drain = subprocess.Popen(["cat"], stdin=proc.stdout, stdout=open(log, "w"))  # noqa: SIM115
        yield f"127.0.0.1:{port}"
    finally:
        # SIGTERM lets `ray start --block` stop its processes; whatever is left then gets SIGKILL
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 30)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        if "drain" in locals():
            drain.wait(timeout=30)


@pytest.mark.needs_data
def test_ray_sweep_on_an_existing_cluster(ray_cluster, pusht_zarr_path, tmp_path):
    sweep_dir = tmp_path / "ray_sweep"
    args = smoke_sweep(pusht_zarr_path, sweep_dir, "training.seed=1,2", "hydra/launcher=ray")
    proc = run_cli([*args, f"hydra.launcher.ray.init.address={ray_cluster}"], env=RAY_ENV, timeout=600)
    assert_ok(proc)
    assert f"Connecting to existing Ray cluster at address: {ray_cluster}" in proc.stdout + proc.stderr
    for job, seed in (("0", 1), ("1", 2)):
        ckpt = load_checkpoint_file(sweep_dir / job / "checkpoints" / "latest.ckpt")
        assert ckpt["state"]["epoch"] == 2
        # one W&B group named after the sweep; each run named by its job and overrides
        logging = OmegaConf.create(ckpt["cfg_yaml"]).logging
        assert logging.group == f"{sweep_dir.parent.name}_{sweep_dir.name}"
        assert logging.name.startswith(f"{job}: ") and f"training.seed={seed}" in logging.name
    table = assert_table_is_the_library_on_the_logs(sweep_dir, ["0", "1"])
    assert table["groups"][0]["aggregate"]["seeds"] == 2 and not table["failed"]


# ----------------------------------------------------------------------------- a failing job
@pytest.mark.needs_data
# submitit_local is left out: once in a full-suite run on a loaded machine one of its job processes left no
# output at all (not even submitit's own start-up lines) and the launcher reported it unfinished; the same
# failure handling runs under SLURM through the same plugin (test_slurm_sweep_...)
@pytest.mark.parametrize("launcher", ["joblib", "ray"])
def test_a_failed_job_neither_stops_the_sweep_nor_hides(launcher, request, pusht_zarr_path, tmp_path):
    env = ENV
    extra = [f"hydra/launcher={launcher}"]
    if launcher == "ray":
        env = RAY_ENV
        extra.append(f"hydra.launcher.ray.init.address={request.getfixturevalue('ray_cluster')}")
    if launcher == "joblib":
        extra.append("hydra.launcher.n_jobs=2")
    sweep_dir = tmp_path / f"failing_{launcher}"
    # job 2 asks for a negative number of epochs: it fails when its workspace checks its config
    args = smoke_sweep(pusht_zarr_path, sweep_dir, "training.num_epochs=1,2,-1", *extra)
    proc = run_cli(args, env=env, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "training.num_epochs=-1" in errors[0] and TABLE_MD in errors[0], errors
    for job, epochs in (("0", 1), ("1", 2)):
        ckpt = load_checkpoint_file(sweep_dir / job / "checkpoints" / "latest.ckpt")
        assert ckpt["state"]["epoch"] == epochs
    table = table_of(sweep_dir)
    assert table["final"] and [g["counts"]["completed"] for g in table["groups"][:2]] == [1, 1]
    (failed,) = table["failed"]
    assert failed["job"] == "2" and failed["status"] == "failed"
    assert "training.num_epochs=-1 is not allowed" in failed["reason"]
    assert "job 2" in (sweep_dir / TABLE_MD).read_text()


# ----------------------------------------------------------------------------- SLURM
SLURM_HELP = (
    "SLURM is not reachable ({why}): install Debian's slurm-wlm and munge, run `bash .ci/start_slurm.sh` "
    "as root (a single-node SLURM on 127.0.0.1) and export the SLURM_CONF it prints"
)


def _slurm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120, check=check)


def _slurm_job_state(job_id: str) -> str:
    """``JobState`` of a SLURM job from ``scontrol show job``; "" when SLURM does not know it (any more)."""
    try:
        out = _slurm("scontrol", "show", "job", "-o", job_id, check=False).stdout
    except subprocess.TimeoutExpired:  # a busy controller: ask again
        return ""
    fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
    return fields.get("JobState", "")


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """A reachable SLURM controller with an idle node; `.ci/run` starts one. On a developer machine run as
    root with slurm-wlm installed, the fixture starts the same one itself."""
    if shutil.which("sinfo") is None:
        pytest.fail(SLURM_HELP.format(why="no sinfo on PATH"))
    probe = _slurm("sinfo", "-h", "-o", "%T", check=False)
    if probe.returncode != 0 and os.geteuid() == 0 and shutil.which("slurmctld"):
        start = subprocess.run(
            ["bash", str(REPO_ROOT / ".ci" / "start_slurm.sh")], capture_output=True, text=True, timeout=120
        )
        if start.returncode == 0:
            os.environ["SLURM_CONF"] = start.stdout.strip().rsplit("=", 1)[-1]
            ENV["SLURM_CONF"] = os.environ["SLURM_CONF"]
        probe = _slurm("sinfo", "-h", "-o", "%T", check=False)
        while probe.returncode == 0 and not probe.stdout.strip():  # controller up, node not registered yet
            time.sleep(0.2)
            probe = _slurm("sinfo", "-h", "-o", "%T", check=False)
    if probe.returncode != 0:
        pytest.fail(SLURM_HELP.format(why=" ".join(probe.stderr.split())[:200]))
    # a drained or down node would leave the sweep's jobs pending forever: say so instead of waiting
    states = probe.stdout.split()
    if not any(s.rstrip("*~#").lower() in ("idle", "mixed", "allocated", "completing") for s in states):
        reason = _slurm("sinfo", "-h", "-R", check=False).stdout.strip()
        pytest.fail(
            f"the SLURM node cannot take jobs (state {states}, reason: {reason or 'none given'}); "
            "`bash .ci/start_slurm.sh` resumes a drained node"
        )


def _wait_for(predicate, what: str, proc: subprocess.Popen, logs: Path):
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(
                f"the sweep ended (exit {proc.returncode}) before {what}:\n{logs.read_text()[-3000:]}"
            )
        time.sleep(0.05)


@pytest.mark.needs_data
def test_slurm_sweep_with_a_requeued_job_ends_with_the_same_weights(slurm_cluster, pusht_zarr_path, tmp_path):
    n_epochs, hold_at = 4, 2
    common = [f"training.num_epochs={n_epochs}", "training.rollout_every=20", "training.checkpoint_every=1"]
    sweep_dir = tmp_path / "slurm_sweep"
    args = smoke_sweep(
        pusht_zarr_path, sweep_dir, "training.seed=1,2", *common, "hydra/launcher=submitit_slurm"
    )
    # handshake: the jobs wait at the start of epoch `hold_at` until the test releases them (hold_point), so
    # the requeue lands mid-run however loaded the machine is; holding changes nothing in the training
    hold_dir = tmp_path / "hold"
    hold_dir.mkdir()
    sweep_env = {**ENV, HOLD_AT_EPOCH: str(hold_at), HOLD_DIR: str(hold_dir)}
    sweep_log = tmp_path / "sweep.log"  # a file, not a pipe: nothing blocks the sweep while we wait
    with open(sweep_log, "w") as log:
        sweep = subprocess.Popen(
            [sys.executable, *args], cwd=REPO_ROOT, env=sweep_env, stdout=log, stderr=log
        )
    # the uninterrupted reference: the same job as a plain run
    reference_dir = tmp_path / "reference"
    reference = subprocess.Popen(
        [
            sys.executable,
            "train.py",
            "debug=smoke",
            "training.seed=1",
            *common,
            f"task.dataset.zarr_path={pusht_zarr_path}",
            f"hydra.run.dir={reference_dir}",
        ],
        cwd=REPO_ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "reference.log", "w"),  # noqa: SIM115  (closed with the process)
    )
    try:
        # job 0 has checkpointed epoch `hold_at` - 1 and is held (or about to be) before epoch `hold_at`
        latest = sweep_dir / "0" / "checkpoints" / "latest.ckpt"

        def job0_at_hold() -> bool:
            return (
                held_marker(hold_dir, hold_at).exists()
                and latest.exists()
                and load_checkpoint_file(latest)["state"]["epoch"] >= hold_at
            )

        _wait_for(job0_at_hold, f"job 0 reached epoch {hold_at}", sweep, sweep_log)
        (job_folder,) = [p for p in (sweep_dir / ".submitit").glob("*_0") if p.is_dir()]
        slurm_id = job_folder.name
        _slurm("scontrol", "requeue", slurm_id)
        # SLURM stops the job, puts it back in the queue and holds it there for a while (BeginTime): once it
        # is pending, release the hold and let it start again now
        _wait_for(
            lambda: _slurm_job_state(slurm_id) == "PENDING", f"job {slurm_id} was requeued", sweep, sweep_log
        )
        (hold_dir / "release").touch()
        _slurm("scontrol", "update", f"JobId={slurm_id}", "StartTime=now")
        sweep.wait(timeout=600)
    finally:
        (hold_dir / "release").touch()
        if sweep.poll() is None:
            sweep.kill()
            sweep.wait()
        # no job of this sweep may outlive the test (an instance of a requeued job once did)
        subprocess.run(["scancel", "--name", "train"], check=False, env=ENV)
    assert sweep.returncode == 0, f"exit {sweep.returncode}\n{sweep_log.read_text()[-3000:]}"
    reference.wait(timeout=600)
    assert reference.returncode == 0, (tmp_path / "reference.log").read_text()[-3000:]

    job_logs = "".join(p.read_text() for p in job_folder.glob("*_log.*"))
    assert "DUE TO JOB REQUEUE" in job_logs
    resumed = [ln for ln in job_logs.splitlines() if ln.startswith("Resuming from")]
    assert len(resumed) == 1, job_logs[-3000:]
    resumed_at = int(resumed[0].split(" at epoch ")[1].split()[0])
    assert resumed_at == hold_at, f"the requeue must land at the hold: {resumed[0]}"
    assert_same_training_state(reference_dir / "checkpoints" / "latest.ckpt", latest)
    table = assert_table_is_the_library_on_the_logs(sweep_dir, ["0", "1"])
    assert table["groups"][0]["counts"]["completed"] == 2 and not table["failed"]
