"""Score and latency against sampling steps, for one or more checkpoints on the same test seeds.

For every checkpoint and step count, evaluates on N test seeds (``eval.py --n-test N`` with one fixed
noise seed, so every cell starts its episodes from the same initial noise) and times ``predict_action`` at
batch 1 on real dataset observations; writes one JSON line per cell and a plot of score against steps.

A diffusion-trained checkpoint is swept with DDIM (the same weights, any step count) and also evaluated
with DDPM over all of its training steps; a flow-matching checkpoint with its ODE solver (Euler by default).

    python -m benchmarks.sampler_sweep --ckpt ddpm=RUN_A/checkpoints/BEST.ckpt \\
        --ckpt flow=RUN_B/checkpoints/BEST.ckpt --steps 1,2,4,8,16 --n-test 500 \\
        --out data/sweeps/pusht_state_cpu --plot docs/img/flow_vs_ddim_steps.png

Cells already in ``OUT/cells.jsonl`` are kept and skipped, so an interrupted sweep continues where it
stopped. Latency is timed for all cells in one block, round-robin, before any evaluation, so the cells of
one sweep share the machine's state.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import sweep_cells


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--ckpt",
        action="append",
        required=True,
        metavar="LABEL=PATH",
        help="a checkpoint to sweep, with its label in tables and plots (repeatable)",
    )
    p.add_argument("--steps", default="1,2,4,8,16", help="comma-separated step counts (default 1,2,4,8,16)")
    p.add_argument("--n-test", type=int, default=500, help="test seeds per cell (default 500)")
    p.add_argument("--noise-seed", type=int, default=0, help="seed of the sampling noise (default 0)")
    p.add_argument("--flow-solver", default="euler", choices=("euler", "midpoint", "heun"))
    p.add_argument("--no-ddpm", action="store_true", help="skip the full DDPM cell of diffusion checkpoints")
    p.add_argument("--latency-repeats", type=int, default=30, help="timed batch-1 calls per cell")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", required=True, help="directory for cells.jsonl and the per-cell eval logs")
    p.add_argument("--plot", default=None, help="also draw score and latency against steps into this PNG")
    p.add_argument("--title", default="score and latency against sampling steps", help="the plot's title")
    p.add_argument(
        "--retime",
        action="store_true",
        help="time the latency of every cell again (e.g. on an idle machine) and rewrite cells.jsonl",
    )
    return p.parse_args(argv)


def cells_for(label: str, path: str, steps: list[int], args: argparse.Namespace) -> list[dict[str, Any]]:
    from diffusion_policy.workspace.base_workspace import load_policy

    policy, _ = load_policy(path, "cpu")
    flow = type(policy.noise_scheduler).__name__ == "FlowMatchingScheduler"
    sampler = args.flow_solver if flow else "ddim"
    cells = [{"ckpt": label, "path": path, "sampler": sampler, "steps": n} for n in steps]
    if not flow and not args.no_ddpm:
        n_train = int(policy.noise_scheduler.config.num_train_timesteps)
        cells.append({"ckpt": label, "path": path, "sampler": "ddpm", "steps": n_train})
    return cells


def cell_name(cell: dict[str, Any]) -> str:
    return f"{cell['ckpt']}.{cell['sampler']}{cell['steps']}"


def latency_observations(cfg: Any, n: int) -> list[dict[str, torch.Tensor]]:
    """``n`` batch-1 observations (1, To, ...) from the checkpoint's own dataset, fixed order."""
    from hydra.utils import instantiate

    dataset = instantiate(cfg.task.dataset)
    rng = np.random.default_rng(0)
    To = int(cfg.n_obs_steps)
    out = []
    for i in rng.choice(len(dataset), size=n, replace=False):
        obs = dataset[int(i)]["obs"]
        if isinstance(obs, dict):
            out.append({k: v[None, :To] for k, v in obs.items()})
        else:
            out.append({"obs": obs[None, :To]})
    return out


def time_latencies(cells: list[dict[str, Any]], repeats: int) -> dict[str, float]:
    """Median batch-1 ``predict_action`` ms per cell, timed round-robin over the cells."""
    from diffusion_policy.policy.samplers import use_sampler
    from diffusion_policy.workspace.base_workspace import load_policy

    policies, observations = {}, {}
    for cell in cells:
        policy, cfg = load_policy(cell["path"], "cpu")
        use_sampler(policy, cell["sampler"], cell["steps"])
        policies[cell_name(cell)] = policy
        if cell["path"] not in observations:
            observations[cell["path"]] = latency_observations(cfg, repeats + 3)
    times: dict[str, list[float]] = {name: [] for name in policies}
    with torch.inference_mode():
        for i in range(repeats + 3):
            for cell in cells:
                name = cell_name(cell)
                obs = observations[cell["path"]][i]
                t0 = time.perf_counter()
                policies[name].predict_action(obs)
                if i >= 3:  # the first calls pay for allocation and kernel selection
                    times[name].append(time.perf_counter() - t0)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def evaluate_cell(cell: dict[str, Any], args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from eval import evaluate  # the repository's eval.py (this runs as ``python -m`` from the root)

    log = evaluate(
        cell["path"],
        str(out / cell_name(cell)),
        device="cpu",
        sampler=cell["sampler"],
        inference_steps=cell["steps"],
        n_test=args.n_test,
        noise_seed=args.noise_seed,
    )
    return sweep_cells.kept_test_scores(log) | {"sampler_label": log["eval/sampler"]}


def plot(rows: list[dict[str, Any]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_score, ax_ms) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label in dict.fromkeys(r["ckpt"] for r in rows):
        for sampler in dict.fromkeys(r["sampler"] for r in rows if r["ckpt"] == label):
            sel = sorted(
                (r for r in rows if r["ckpt"] == label and r["sampler"] == sampler), key=lambda r: r["steps"]
            )
            x = [r["steps"] for r in sel]
            y = [r["mean_score"] for r in sel]
            err = [
                [r["mean_score"] - r["mean_score_ci95_low"] for r in sel],
                [r["mean_score_ci95_high"] - r["mean_score"] for r in sel],
            ]
            name = f"{label}: {sampler}"
            if len(sel) == 1:
                ax_score.axhspan(
                    sel[0]["mean_score_ci95_low"], sel[0]["mean_score_ci95_high"], alpha=0.2, color="grey"
                )
                ax_score.axhline(y[0], color="grey", ls="--", label=f"{name}-{x[0]} (95% CI band)")
                ax_ms.axhline(sel[0]["latency_ms_b1"], color="grey", ls="--", label=f"{name}-{x[0]}")
                continue
            ax_score.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name)
            ax_ms.plot(x, [r["latency_ms_b1"] for r in sel], marker="o", label=name)
    n = rows[0]["n_episodes"]
    ax_score.set(
        xscale="log", xlabel="sampling steps (denoiser calls)", ylabel=f"test/mean_score ({n} seeds)"
    )
    ax_score.set_xticks(sorted({r["steps"] for r in rows if r["steps"] <= 64}))
    ax_score.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax_score.grid(alpha=0.3)
    ax_score.legend(fontsize=8)
    ax_ms.set(xscale="log", yscale="log", xlabel="sampling steps", ylabel="predict_action ms, batch 1")
    for axis in (ax_ms.get_xaxis(), ax_ms.get_yaxis()):
        axis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax_ms.set_xticks(ax_score.get_xticks())
    ax_ms.grid(alpha=0.3)
    ax_ms.legend(fontsize=8)
    sweep_cells.save_figure(fig, path, f"{title} ({rows[0]['hardware']})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    steps = sweep_cells.comma_list(args.steps, int)
    if not steps or min(steps) < 1:
        raise SystemExit(f"--steps {args.steps!r}: give step counts >= 1")
    checkpoints, out, hardware = sweep_cells.start(args)
    cells = [c for label, path in checkpoints for c in cells_for(label, path, steps, args)]
    done_path = out / "cells.jsonl"
    done = sweep_cells.read_cells(done_path, cell_name)
    todo = [c for c in cells if cell_name(c) not in done]
    if todo:
        print(f"timing batch-1 latency of {len(todo)} cells ...", file=sys.stderr, flush=True)
        latencies = time_latencies(todo, args.latency_repeats)
    for i, cell in enumerate(todo):
        name = cell_name(cell)
        t0 = time.perf_counter()
        print(
            f"[{i + 1}/{len(todo)}] {name}: evaluating {args.n_test} test seeds ...",
            file=sys.stderr,
            flush=True,
        )
        row = {**cell, **evaluate_cell(cell, args, out), "latency_ms_b1": latencies[name]}
        row["eval_s"] = round(time.perf_counter() - t0, 1)
        row["hardware"] = hardware
        done[name] = row
        sweep_cells.append_cell(done_path, row)
        print(
            f"{name}: {row['mean_score']:.3f} "
            f"({sweep_cells.ci_text(row)}) "
            f"success {row['success_rate']:.3f}, {row['latency_ms_b1']:.1f} ms/call, eval {row['eval_s']} s",
            file=sys.stderr,
            flush=True,
        )
    rows = [done[cell_name(c)] for c in cells]
    if args.retime:
        print(f"timing batch-1 latency of all {len(rows)} cells again ...", file=sys.stderr, flush=True)
        latencies = time_latencies(cells, args.latency_repeats)
        for row in rows:
            row["latency_ms_b1"], row["hardware"] = latencies[cell_name(row)], hardware
        tmp = done_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, done_path)
    print(f"{'cell':<22} {'score':>6} {'95% CI':>13} {'success':>8} {'ms (b1)':>8}")
    for r in rows:
        ci = sweep_cells.ci_text(r)
        score, success, ms = r["mean_score"], r["success_rate"], r["latency_ms_b1"]
        print(f"{cell_name(r):<22} {score:>6.3f} {ci:>13} {success:>8.3f} {ms:>8.2f}")
    if args.plot:
        plot(rows, args.plot, args.title)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
