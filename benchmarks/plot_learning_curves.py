"""Draw learning curves from one or more training runs' ``logs.json.txt`` into one PNG.

Panels: ``test/mean_score`` (and ``train/mean_score``, dashed) against epoch; the same against wall-clock
hours when the log carries elapsed time; train loss (epoch mean) and validation loss against epoch (log
scale); ``test/success_rate`` against epoch when logged. Runs are overlaid, one colour each.

    python -m benchmarks.plot_learning_curves data/outputs/RUN1 data/outputs/RUN2 \\
        --labels "paper state,CPU recipe" --out docs/img/pusht_state_curves.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from diffusion_policy.common.aggregate_metrics import (  # noqa: E402
    SCORE_KEY,
    SUCCESS_KEY,
    eval_rows,
    load_log,
    resolve_log_path,
    wall_clock,
)


def epoch_losses(rows: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
    """Train loss per epoch: the epoch's last logged value (the loop logs the epoch mean there)."""
    last: dict[int, float] = {}
    for r in rows:
        if "epoch" in r and isinstance(r.get("train_loss"), int | float):
            last[int(r["epoch"])] = float(r["train_loss"])
    epochs = sorted(last)
    return epochs, [last[e] for e in epochs]


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pts = [(float(r["epoch"]), float(r[key])) for r in eval_rows(rows, key) if "epoch" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot(runs: list[tuple[str, list[dict[str, Any]]]], out: Path, title: str | None = None) -> Path:
    has_time = any(wall_clock(rows) for _, rows in runs)
    has_success = any(eval_rows(rows, SUCCESS_KEY) for _, rows in runs)
    panels = ["score", "loss"] + (["time"] if has_time else []) + (["success"] if has_success else [])
    ncols = 2
    nrows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 4.2 * nrows), squeeze=False)
    ax = dict(zip(panels, axes.flat))
    for extra in list(axes.flat)[len(panels) :]:
        extra.set_visible(False)

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, rows) in enumerate(runs):
        c = colors[i % len(colors)]
        x, y = series(rows, SCORE_KEY)
        ax["score"].plot(x, y, color=c, marker=".", label=f"{label} test")
        x, y = series(rows, "train/mean_score")
        if x:
            ax["score"].plot(x, y, color=c, linestyle="--", alpha=0.6, label=f"{label} train")
        x, y = epoch_losses(rows)
        ax["loss"].plot(x, y, color=c, label=f"{label} train")
        x, y = series(rows, "val_loss")
        if x:
            ax["loss"].plot(x, y, color=c, linestyle=":", label=f"{label} val")
        clock = wall_clock(rows)
        if "time" in ax and clock:
            x, y = series(rows, SCORE_KEY)
            pts = [(clock[int(e)] / 3600.0, v) for e, v in zip(x, y) if int(e) in clock]
            ax["time"].plot([p[0] for p in pts], [p[1] for p in pts], color=c, marker=".", label=label)
        if "success" in ax:
            x, y = series(rows, SUCCESS_KEY)
            ax["success"].plot(x, y, color=c, marker=".", label=label)

    ax["score"].set(
        xlabel="epoch", ylabel=SCORE_KEY, title="test score (mean over test seeds)", ylim=(0, 1.02)
    )
    ax["loss"].set(xlabel="epoch", ylabel="loss", title="diffusion loss", yscale="log")
    if "time" in ax:
        ax["time"].set(
            xlabel="wall time (h)", ylabel=SCORE_KEY, title="test score vs wall time", ylim=(0, 1.02)
        )
    if "success" in ax:
        ax["success"].set(
            xlabel="epoch", ylabel=SUCCESS_KEY, title="success (max coverage > 0.95)", ylim=(0, 1.02)
        )
    for a in ax.values():
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+", help="logs.json.txt files or run directories")
    p.add_argument("--labels", default=None, help="comma-separated legend labels, one per log")
    p.add_argument("--out", default="learning_curves.png", help="PNG to write (default: learning_curves.png)")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [resolve_log_path(x).parent.name for x in args.logs]
    if len(labels) != len(args.logs):
        p.error(f"--labels has {len(labels)} entries for {len(args.logs)} logs")
    runs = []
    for label, path in zip(labels, args.logs):
        rows = load_log(path)
        if not eval_rows(rows) and not epoch_losses(rows)[0]:
            print(
                f"plot_learning_curves: {path} has neither {SCORE_KEY} nor train_loss rows", file=sys.stderr
            )
            return 2
        runs.append((label, rows))
    out = plot(runs, Path(args.out), args.title)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
