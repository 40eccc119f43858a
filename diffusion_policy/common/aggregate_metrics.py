"""Aggregate the test scores of one or several training runs the way the paper reports them.

For each run (one ``logs.json.txt``, one JSON object per line, as the training loop writes it) the
evaluation rows are the lines that carry ``test/mean_score``. Per run we take

- ``max``: the best ``test/mean_score`` over all evaluations;
- ``last10``: the mean ``test/mean_score`` of the last 10 evaluations (the paper's second number);
- ``k_min_train_loss``: the original code's exact aggregation key for that second number, the mean score of
  the 10 evaluations with the lowest epoch train loss (in practice close to the last 10);
- ``test/success_rate`` (fraction of test episodes whose max coverage exceeded 0.95): at the last 10
  evaluations (mean) and at the best-scoring one.

Several runs (seeds) are averaged per metric, as the original's ``multirun_metrics`` does, with a 95%
interval across seeds (Student's t) for ``max`` and ``last10``, and the result is printed as a markdown
table row:

    python -m benchmarks.aggregate_metrics outputs/seed42 outputs/seed43 outputs/seed44 --label "state CNN"
    python -m benchmarks.aggregate_metrics run/logs.json.txt --header --json

This module is the one implementation: ``python -m benchmarks.aggregate_metrics`` is its command line, and the
sweep table (``diffusion_policy.common.sweep_metrics``) applies it to every group of seeds of a sweep.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

SCORE_KEY = "test/mean_score"
SUCCESS_KEY = "test/success_rate"
# keys holding elapsed wall-clock seconds since the run started, in order of preference
TIME_KEYS = ("wall_time", "wall_time_s", "elapsed_s", "time_s", "time")
# per-epoch duration logged by our training loop; summed when no elapsed-time key exists
EPOCH_TIME_KEY = "time/epoch_s"

COLUMNS = (
    "run",
    "seeds",
    "max test/mean_score",
    "mean of last 10",
    "test/success_rate (last 10)",
    "evaluations",
    "last epoch",
    "optimizer steps",
    "wall time (h)",
)


def resolve_log_path(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "logs.json.txt"
    if not p.is_file():
        raise FileNotFoundError(f"no log file at {p}: pass a logs.json.txt or the run directory holding it")
    return p


def load_log(path: str | Path) -> list[dict[str, Any]]:
    """All complete JSON lines of a ``logs.json.txt``; a torn last line (killed run) is ignored."""
    rows = []
    lines = resolve_log_path(path).read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON") from None
    return rows


def wall_clock(rows: list[dict[str, Any]]) -> dict[int, float]:
    """Elapsed seconds at the end of each epoch: an elapsed-time key if logged, else the running sum of
    ``time/epoch_s`` (which leaves out start-up and checkpoint writes). Empty when the log has neither."""
    for key in (*TIME_KEYS, EPOCH_TIME_KEY):
        per_epoch: dict[int, float] = {}
        for r in rows:
            if _finite(r.get(key)) and _finite(r.get("epoch")):
                per_epoch[int(r["epoch"])] = float(r[key])  # a re-logged epoch keeps its last value
        if per_epoch and key != EPOCH_TIME_KEY:
            return per_epoch
        if per_epoch:
            total, clock = 0.0, {}
            for epoch in sorted(per_epoch):
                total += per_epoch[epoch]
                clock[epoch] = total
            return clock
    return {}


def eval_rows(rows: list[dict[str, Any]], key: str = SCORE_KEY) -> list[dict[str, Any]]:
    """Rows holding ``key`` in training order; an epoch logged twice (resume) keeps its last row."""
    by_epoch: dict[Any, dict[str, Any]] = {}
    for i, r in enumerate(rows):
        if key in r and _finite(r[key]):
            by_epoch[r.get("epoch", ("row", i))] = r
    return sorted(by_epoch.values(), key=lambda r: (r.get("epoch", 0), r.get("global_step", 0)))


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def run_metrics(rows: list[dict[str, Any]], last_k: int = 10) -> dict[str, Any]:
    """Metrics of one run (one seed)."""
    evals = eval_rows(rows)
    if not evals:
        raise ValueError(f"no evaluation rows: no line carries {SCORE_KEY!r}")
    scores = [float(r[SCORE_KEY]) for r in evals]
    last = evals[-last_k:]
    best = evals[max(range(len(scores)), key=scores.__getitem__)]
    with_loss = [r for r in evals if _finite(r.get("train_loss"))]
    k_min = sorted(with_loss, key=lambda r: r["train_loss"])[:last_k]
    clock = wall_clock(rows)
    return {
        "max": max(scores),
        "last10": _mean([float(r[SCORE_KEY]) for r in last]),
        "k_min_train_loss": _mean([float(r[SCORE_KEY]) for r in k_min]),
        "success_last10": _mean([float(r[SUCCESS_KEY]) for r in last if _finite(r.get(SUCCESS_KEY))]),
        "success_at_max": float(best[SUCCESS_KEY]) if _finite(best.get(SUCCESS_KEY)) else None,
        "evaluations": len(evals),
        "best_epoch": best.get("epoch"),
        "last_epoch": max((r["epoch"] for r in rows if _finite(r.get("epoch"))), default=None),
        # the loop logs global_step before incrementing it, so steps taken = last logged value + 1
        "optimizer_steps": max(
            (r["global_step"] + 1 for r in rows if _finite(r.get("global_step"))), default=None
        ),
        "wall_time_h": (max(clock.values()) / 3600.0) if clock else None,
    }


def aggregate(per_run: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over runs of each metric (None where no run has it), plus the spread of the two scores: the
    population std (``max_std``, ``last10_std``) and the 95% interval across seeds (``max_ci95``, ...)."""
    out: dict[str, Any] = {"seeds": len(per_run)}
    for key in per_run[0]:
        vals = [m[key] for m in per_run if m[key] is not None]
        out[key] = _mean([float(v) for v in vals]) if vals else None
    for key in ("max", "last10"):
        vals = [m[key] for m in per_run]
        mu = sum(vals) / len(vals)
        out[f"{key}_std"] = math.sqrt(sum((v - mu) ** 2 for v in vals) / len(vals)) if len(vals) > 1 else None
        interval = seed_interval(vals)
        out[f"{key}_ci95"] = list(interval) if interval is not None else None
    return out


# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (standard tables); beyond, normal.
# Written out because the project does not depend on scipy; the seed counts of a study are small.
_T95 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
_Z95 = 1.959963984540054


def seed_interval(values: list[float]) -> tuple[float, float] | None:
    """95% interval of the mean over seeds, ``mean +/- t(0.975, n-1) * sd / sqrt(n)``; None for one seed."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    sd = math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1))
    half = (_T95[n - 2] if n - 1 <= len(_T95) else _Z95) * sd / math.sqrt(n)
    return mu - half, mu + half


def _fmt(x: Any, digits: int = 3, std: float | None = None) -> str:
    if x is None:
        return "-"
    s = f"{x:.{digits}f}" if digits else str(round(x))
    return f"{s} ± {std:.3f}" if std is not None else s


def markdown_row(label: str, agg: dict[str, Any]) -> str:
    cells = [
        label,
        str(agg["seeds"]),
        _fmt(agg["max"], std=agg.get("max_std")),
        _fmt(agg["last10"], std=agg.get("last10_std")),
        _fmt(agg["success_last10"]),
        _fmt(agg["evaluations"], 0),
        _fmt(agg["last_epoch"], 0),
        _fmt(agg["optimizer_steps"], 0),
        _fmt(agg["wall_time_h"], 2),
    ]
    return "| " + " | ".join(cells) + " |"


def markdown_header() -> str:
    return "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+", help="logs.json.txt files or run directories, one per seed")
    p.add_argument("--label", default=None, help="first cell of the row (default: the first run's folder)")
    p.add_argument("--last-k", type=int, default=10, help="evaluations averaged for the second number")
    p.add_argument("--header", action="store_true", help="print the table header first")
    p.add_argument("--json", action="store_true", help="also print per-run and aggregated metrics as JSON")
    args = p.parse_args(argv)
    if args.last_k < 1:
        p.error(f"--last-k must be >= 1, got {args.last_k}")

    per_run = []
    for path in args.logs:
        try:
            per_run.append(run_metrics(load_log(path), args.last_k))
        except (OSError, ValueError) as e:
            print(f"aggregate_metrics: {path}: {e}", file=sys.stderr)
            return 2
    agg = aggregate(per_run)
    label = args.label or resolve_log_path(args.logs[0]).parent.name
    if args.header:
        print(markdown_header())
    print(markdown_row(label, agg))
    if args.json:
        print(json.dumps({"label": label, "runs": per_run, "aggregate": agg}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
