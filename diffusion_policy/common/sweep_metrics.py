"""The table of a sweep, the paper's way: per group of jobs that differ only in ``training.seed``, the
number of seeds, ``max``, mean of the last 10 evaluations, ``k_min_train_loss``, success rate and a 95%
interval across seeds, plus every failed job with the reason it failed.

Three ways in, one implementation (the numbers come from ``common.aggregate_metrics``):

- :class:`SweepMetricsCallback`, a Hydra callback declared in ``config/_train_common.yaml``: when a sweep
  job ends (any launcher: basic, joblib, ray, submitit) it records the job's outcome in
  ``<job dir>/job_status.json`` and rewrites ``<sweep dir>/multirun_metrics.json`` and
  ``multirun_metrics.md``; once more when the sweep ends.
- ``python -m diffusion_policy.common.sweep_metrics SWEEP_DIR [--follow SECONDS]`` prints the same table
  from outside, while the sweep runs (jobs still training count with what they logged so far).
- :func:`sweep_table` / :func:`write_table` from Python.

The job's ``on_job_end`` runs where the job ran (a Ray worker, a SLURM node), so the sweep directory must be
on a filesystem every node sees, as Hydra's job directories are anyway. Concurrent writers take a lock file
and each rewrite reads every job from disk, so the last writer's table holds every job that had ended.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from diffusion_policy.common import aggregate_metrics as am

STATUS_FILE = "job_status.json"
TABLE_JSON = "multirun_metrics.json"
TABLE_MD = "multirun_metrics.md"
LOCK_FILE = ".multirun_metrics.lock"
SEED_KEY = "training.seed"

COMPLETED, FAILED, RUNNING, NO_RESULT = "completed", "failed", "running", "no result"
NO_RESULT_REASON = (
    "ended without reporting (killed, or stopped by a signal and not requeued); rerun the sweep with the "
    "same hydra.sweep.dir to resume it"
)


# ----------------------------------------------------------------------------- reading a sweep
def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _job_sort_key(name: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in Path(name).parts)


def find_job_dirs(sweep_dir: Path) -> list[Path]:
    """Job directories of a sweep: those holding Hydra's ``.hydra/overrides.yaml`` (written as a job
    starts), at any depth of ``hydra.sweep.subdir``, outside submitit's own folder."""
    found = []
    for overrides in sweep_dir.rglob(".hydra/overrides.yaml"):
        job_dir = overrides.parent.parent
        rel = job_dir.relative_to(sweep_dir)
        if job_dir != sweep_dir and not any(p.startswith(".") for p in rel.parts):
            found.append(job_dir)
    return sorted(found, key=lambda d: _job_sort_key(str(d.relative_to(sweep_dir))))


def read_job(job_dir: Path, sweep_dir: Path, final: bool, last_k: int) -> dict[str, Any]:
    """One job: its overrides, outcome and (when it logged evaluations) its per-run metrics."""
    overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or []
    job: dict[str, Any] = {
        "job": str(job_dir.relative_to(sweep_dir)),
        "dir": str(job_dir),
        "overrides": [str(o) for o in overrides],
        "status": NO_RESULT if final else RUNNING,
        "reason": NO_RESULT_REASON if final else None,
        "metrics": None,
    }
    status_path = job_dir / STATUS_FILE
    if status_path.is_file():
        status = json.loads(status_path.read_text())
        job["status"], job["reason"] = status["status"], status.get("reason")
    log = job_dir / "logs.json.txt"
    if log.is_file():
        with contextlib.suppress(ValueError):  # no evaluation logged yet
            job["metrics"] = am.run_metrics(am.load_log(log), last_k)
    return job


def sweep_table(sweep_dir: str | os.PathLike, final: bool = False, last_k: int = 10) -> dict[str, Any]:
    """The table of a sweep as a dict (the content of ``multirun_metrics.json``).

    ``final``: the sweep is over, so a job that never reported is listed as ended without a result
    rather than as running.
    """
    sweep_dir = Path(sweep_dir).absolute()
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"no sweep directory at {sweep_dir}: pass the hydra.sweep.dir of a sweep")
    jobs = [read_job(d, sweep_dir, final, last_k) for d in find_job_dirs(sweep_dir)]
    seedless = [[o for o in j["overrides"] if _override_key(o) != SEED_KEY] for j in jobs]
    common = [o for o in seedless[0] if all(o in s for s in seedless)] if jobs else []

    groups: dict[tuple[str, ...], dict[str, Any]] = {}
    for job, overrides in zip(jobs, seedless):
        key = tuple(sorted(overrides))
        label = " ".join(o for o in overrides if o not in common) or "all jobs"
        group = groups.setdefault(key, {"label": label, "overrides": overrides, "jobs": []})
        group["jobs"].append(job)
    for group in groups.values():
        # failed jobs do not count as seeds; running ones do, with what they logged so far
        runs = [j["metrics"] for j in group["jobs"] if j["metrics"] is not None and j["status"] != FAILED]
        group["aggregate"] = am.aggregate(runs) if runs else None
        group["counts"] = {
            s: sum(j["status"] == s for j in group["jobs"]) for s in (COMPLETED, RUNNING, FAILED, NO_RESULT)
        }
    return {
        "sweep_dir": str(sweep_dir),
        "updated": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "final": final,
        "last_k": last_k,
        "common_overrides": common,
        "groups": list(groups.values()),
        "failed": [
            {"job": j["job"], "overrides": j["overrides"], "status": j["status"], "reason": j["reason"]}
            for j in jobs
            if j["status"] in (FAILED, NO_RESULT)
        ],
    }


# ----------------------------------------------------------------------------- rendering and writing
COLUMNS = (
    "group",
    "seeds",
    "jobs (done / running / failed)",
    "max test/mean_score",
    "max 95% CI",
    "mean of last 10",
    "last 10 95% CI",
    "k_min_train_loss",
    "success rate (last 10)",
    "last epoch",
)


def _num(x: Any, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _ci(interval: list[float] | None) -> str:
    return "-" if interval is None else f"[{interval[0]:.3f}, {interval[1]:.3f}]"


def render_markdown(table: dict[str, Any]) -> str:
    state = "finished" if table["final"] else "in progress"
    lines = [f"# Sweep {table['sweep_dir']}", "", f"{state}; updated {table['updated']}", ""]
    if table["common_overrides"]:
        lines += ["Overrides of every job: `" + " ".join(table["common_overrides"]) + "`", ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for g in table["groups"]:
        a, c = g["aggregate"] or {}, g["counts"]
        failed = c[FAILED] + c[NO_RESULT]
        cells = [
            g["label"],
            str(a.get("seeds", 0)),
            f"{c[COMPLETED]} / {c[RUNNING]} / {failed}",
            _num(a.get("max")),
            _ci(a.get("max_ci95")),
            _num(a.get("last10")),
            _ci(a.get("last10_ci95")),
            _num(a.get("k_min_train_loss")),
            _num(a.get("success_last10")),
            _num(a.get("last_epoch"), 0),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Scores are means over seeds of each job's value; last 10 = the last {table['last_k']} "]
    lines[-1] += "evaluations; 95% CI = Student's t interval across seeds."
    if table["failed"]:
        lines += ["", "Failed jobs:", ""]
        for f in table["failed"]:
            lines.append(f"- job {f['job']} (`{' '.join(f['overrides'])}`): {f['status']}: {f['reason']}")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _locked(sweep_dir: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: writes stay atomic, only their order is not serialised
        yield
        return
    with open(sweep_dir / LOCK_FILE, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_table(sweep_dir: str | os.PathLike, final: bool = False, last_k: int = 10) -> dict[str, Any]:
    """Rewrite ``multirun_metrics.json`` and ``.md`` in ``sweep_dir`` atomically; returns the table."""
    sweep_dir = Path(sweep_dir).absolute()
    with _locked(sweep_dir):
        table = sweep_table(sweep_dir, final=final, last_k=last_k)
        _atomic_write_text(sweep_dir / TABLE_JSON, json.dumps(table, indent=2) + "\n")
        _atomic_write_text(sweep_dir / TABLE_MD, render_markdown(table))
    return table


def one_line_reason(error: BaseException) -> str:
    """The reason a job failed, on one line: the message of our one-line errors, else type and message."""
    from diffusion_policy.common.errors import SweepJobFailed

    if isinstance(error, SweepJobFailed):
        return error.message
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def record_job_end(job_dir: str | os.PathLike, failed_with: BaseException | None) -> None:
    """Write ``<job dir>/job_status.json``: completed, or failed with its one-line reason."""
    status = {"status": COMPLETED, "reason": None}
    if failed_with is not None:
        status = {"status": FAILED, "reason": one_line_reason(failed_with)}
    _atomic_write_text(Path(job_dir) / STATUS_FILE, json.dumps(status) + "\n")


# ----------------------------------------------------------------------------- Hydra side
def is_multirun(hydra_cfg) -> bool:
    from hydra.types import RunMode

    return hydra_cfg is not None and hydra_cfg.get("mode") == RunMode.MULTIRUN


def wandb_names(hydra_cfg) -> tuple[str, str]:
    """W&B group and run name of a sweep job: the group is named after the sweep directory (its last two
    parts, e.g. ``2026.01.31_12.00.00_train_...``), the name after the job and its overrides."""
    sweep_dir = Path(str(hydra_cfg.sweep.dir)).absolute()
    group = f"{sweep_dir.parent.name}_{sweep_dir.name}"
    job_dir = Path(str(hydra_cfg.runtime.output_dir))
    job = job_dir.relative_to(sweep_dir) if job_dir.is_relative_to(sweep_dir) else job_dir.name
    overrides = " ".join(str(o) for o in hydra_cfg.overrides.task)
    return group, f"{job}: {overrides}" if overrides else str(job)


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra-core is a dependency
    Callback = object


class SweepMetricsCallback(Callback):
    """Hydra callback (``hydra.callbacks.sweep_metrics`` in ``config/_train_common.yaml``): keeps
    ``<sweep dir>/multirun_metrics.{json,md}`` current as sweep jobs end. Does nothing in single runs."""

    def __init__(self, last_k: int = 10):
        self.last_k = int(last_k)

    def on_job_start(self, config, **kwargs: Any) -> None:
        if is_multirun(config.hydra):
            # a rerun of the sweep (to resume it) starts each job afresh: its old outcome no longer holds
            (Path(str(config.hydra.runtime.output_dir)) / STATUS_FILE).unlink(missing_ok=True)

    def on_job_end(self, config, job_return, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        if not is_multirun(config.hydra):
            return
        # (the public return_value re-raises a failed job's exception; the exception itself is the reason)
        failed = job_return._return_value if job_return.status == JobStatus.FAILED else None
        record_job_end(config.hydra.runtime.output_dir, failed)
        write_table(_sweep_dir_of_job(config), last_k=self.last_k)

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if sweep_dir.is_dir():
            table = write_table(sweep_dir, final=True, last_k=self.last_k)
            print(
                f"sweep table: {sweep_dir.absolute() / TABLE_MD} ({len(table['failed'])} failed)", flush=True
            )


def _sweep_dir_of_job(config) -> Path:
    """The sweep directory as the job saw it: its output dir minus ``hydra.sweep.subdir`` (the launcher
    process and a worker on another node may have different working directories)."""
    job_dir = Path(str(config.hydra.runtime.output_dir))
    depth = len(Path(str(config.hydra.sweep.subdir)).parts)
    return job_dir.parents[depth - 1] if depth > 0 else job_dir


# ----------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m diffusion_policy.common.sweep_metrics",
        description=(
            "Print the table of a sweep (running or finished): per group of jobs that differ only in "
            "training.seed, seeds, max and mean of the last 10 test/mean_score, k_min_train_loss, success "
            "rate and 95%% intervals across seeds, and the failed jobs with their reasons. It is the table "
            "the sweep itself keeps in <sweep dir>/multirun_metrics.md, computed afresh from the jobs' logs."
        ),
    )
    p.add_argument("sweep_dir", help="the sweep's hydra.sweep.dir (it holds one directory per job)")
    p.add_argument("--json", action="store_true", help="print the table as JSON instead of markdown")
    p.add_argument("--last-k", type=int, default=10, help="evaluations averaged for the second number")
    p.add_argument(
        "--follow",
        type=float,
        metavar="SECONDS",
        default=None,
        help="reprint every SECONDS until no job is running (Ctrl-C to stop)",
    )
    p.add_argument("--write", action="store_true", help="also rewrite multirun_metrics.json/.md")
    args = p.parse_args(argv)
    if args.last_k < 1:
        p.error(f"--last-k must be >= 1, got {args.last_k}")
    if args.follow is not None and args.follow <= 0:
        p.error(f"--follow must be > 0 seconds, got {args.follow}")
    sweep_dir = Path(args.sweep_dir)
    if not sweep_dir.is_dir():
        print(f"error: no sweep directory at {sweep_dir}: pass a sweep's hydra.sweep.dir", file=sys.stderr)
        return 2
    if not find_job_dirs(sweep_dir):
        print(f"error: {sweep_dir} holds no sweep jobs yet (no */.hydra/overrides.yaml)", file=sys.stderr)
        return 2
    try:
        while True:
            table = write_table(sweep_dir, last_k=args.last_k) if args.write else None
            table = table or sweep_table(sweep_dir, last_k=args.last_k)
            print(json.dumps(table, indent=2) if args.json else render_markdown(table), flush=True)
            running = sum(g["counts"][RUNNING] for g in table["groups"])
            if args.follow is None or running == 0:
                return 0
            time.sleep(args.follow)
    except KeyboardInterrupt:
        return 130
    except ValueError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
