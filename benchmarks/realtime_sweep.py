"""Score against inference delay for every execution mode, and the latency each delay stands for.

For every checkpoint, delay D and mode, evaluates on N test seeds (``eval.py --n-test N --delay D
--execution MODE`` with one fixed noise seed, so every cell starts from the same initial noise) and writes one
JSON line per cell; then times batch-1 inference of each checkpoint (torch with its sampler, torch with RTC
guidance, and the exported policy on onnxruntime and OpenVINO) and converts it to the delay it means at a
control rate (``ceil(ms * hz / 1000)`` steps). Draws score and success against D.

    python -m benchmarks.realtime_sweep --ckpt ddpm=RUN_A/checkpoints/BEST.ckpt \\
        --ckpt flow=RUN_B/checkpoints/BEST.ckpt --delays 0,1,2,4,6 --n-test 500 \\
        --out data/sweeps/realtime --plot docs/img/pusht_state_score_vs_delay.png

Cells already in ``OUT/cells.jsonl`` are kept and skipped, so an interrupted sweep continues where it
stopped. ``sync`` runs at D = 0 only (it is the world-waits protocol); ``async`` at D = 0 is the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import sweep_cells
from benchmarks.sampler_sweep import latency_observations
from diffusion_policy.common.chunk_execution import MODES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", action="append", required=True, metavar="LABEL=PATH", help="repeatable")
    p.add_argument("--delays", default="0,1,2,4,6", help="comma-separated delays in control steps")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {','.join(MODES)}")
    p.add_argument(
        "--rtc-methods",
        default="guidance",
        help="comma-separated rtc guidance methods per cell (guidance, inpaint; default guidance)",
    )
    p.add_argument("--n-test", type=int, default=500, help="test seeds per cell (default 500)")
    p.add_argument("--noise-seed", type=int, default=0, help="seed of the sampling noise (default 0)")
    p.add_argument("--control-hz", type=float, default=10.0, help="control rate for the latency table")
    p.add_argument("--latency-repeats", type=int, default=30, help="timed batch-1 calls per backend")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--skip-latency", action="store_true", help="evaluate only; no latency table")
    p.add_argument("--out", required=True, help="directory for cells.jsonl, latency.json and eval logs")
    p.add_argument("--plot", default=None, help="draw score and success against delay into this PNG")
    return p.parse_args(argv)


def cell_name(cell: dict[str, Any]) -> str:
    method = f"-{cell['rtc_method']}" if cell["mode"] == "rtc" else ""
    return f"{cell['ckpt']}.{cell['mode']}{method}.d{cell['delay']}"


def cells_for(checkpoints, delays, modes, methods) -> list[dict[str, Any]]:
    cells = []
    for label, path in checkpoints:
        for delay in delays:
            for mode in modes:
                if mode == "sync" and delay > 0 or mode == "async" and delay == 0 and "sync" in modes:
                    continue
                for method in methods if mode == "rtc" else ["guidance"]:
                    cells.append(
                        {"ckpt": label, "path": path, "mode": mode, "delay": delay, "rtc_method": method}
                    )
    return cells


def evaluate_cell(cell: dict[str, Any], args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from eval import evaluate  # the repository's eval.py (this runs as ``python -m`` from the root)

    log = evaluate(
        cell["path"],
        str(out / cell_name(cell)),
        device="cpu",
        n_test=args.n_test,
        noise_seed=args.noise_seed,
        execution=cell["mode"],
        delay=cell["delay"],
        rtc_method=cell["rtc_method"],
    )
    return sweep_cells.kept_test_scores(log) | {
        "sampler": log["eval/sampler"],
        "overlap": log["eval/overlap"],
    }


def time_backends(label: str, path: str, args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    """Median batch-1 latency of one checkpoint per backend, and the delay it means at ``control_hz``."""
    from diffusion_policy.common.chunk_execution import rtc_weights
    from diffusion_policy.deploy import load_exported_policy
    from diffusion_policy.deploy.exporter import export_checkpoint
    from diffusion_policy.workspace.base_workspace import load_policy

    policy, cfg = load_policy(path, "cpu")
    observations = latency_observations(cfg, args.latency_repeats + 3)
    h = policy.chunk_length
    guide = (torch.zeros(1, h, policy.action_dim), rtc_weights(2, h - policy.n_action_steps, h))
    export_dir = workdir / f"export_{label}"
    export_checkpoint(path, export_dir, overwrite=True)
    calls = {
        "torch": lambda obs: policy.predict_action(obs),
        "torch + rtc guidance": lambda obs: policy.predict_action(obs, guide=guide),
    }
    for backend in ("onnxruntime", "openvino"):
        exported = load_exported_policy(export_dir, backend, threads=args.threads)
        calls[backend] = lambda obs, e=exported: e.predict_action({k: v.numpy() for k, v in obs.items()})
    times: dict[str, list[float]] = {name: [] for name in calls}
    for i, obs in enumerate(observations):  # round-robin, so the backends share the machine's state
        for name, call in calls.items():
            t0 = time.perf_counter()
            with torch.no_grad():
                call(obs)
            if i >= 3:  # the first calls pay for allocation and kernel selection
                times[name].append(time.perf_counter() - t0)
    rows = []
    for name, samples in times.items():
        ms = 1000 * statistics.median(samples)
        delay = math.ceil(ms * args.control_hz / 1000 - 1e-9)
        rows.append(
            {"ckpt": label, "backend": name, "sampler": cfg_sampler(policy), "ms_b1": ms, "delay": delay}
        )
    return rows


def cfg_sampler(policy: Any) -> str:
    from diffusion_policy.policy.samplers import sampler_label

    return sampler_label(policy)


def plot(rows: list[dict[str, Any]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["ckpt"] for r in rows))
    fig, axes = plt.subplots(1, len(labels), figsize=(5.5 * len(labels), 4.2), squeeze=False)
    for ax, label in zip(axes[0], labels):
        mine = [r for r in rows if r["ckpt"] == label]
        sync = [r for r in mine if r["mode"] == "sync"]
        for name in dict.fromkeys(cell_name(r).split(".")[1] for r in mine if r["mode"] != "sync"):
            sel = sorted((r for r in mine if cell_name(r).split(".")[1] == name), key=lambda r: r["delay"])
            if name == "async":  # async at D = 0 is the sync run
                sel = sync + sel
            x = [r["delay"] for r in sel]
            y = [r["mean_score"] for r in sel]
            err = [[r["mean_score"] - r["mean_score_ci95_low"] for r in sel]]
            err.append([r["mean_score_ci95_high"] - r["mean_score"] for r in sel])
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name)
        if sync:
            ax.axhline(sync[0]["mean_score"], color="grey", ls="--", lw=1, label="sync, D = 0")
        ax.set(
            xlabel="inference delay D (control steps)",
            ylabel=f"test/mean_score ({mine[0]['n_episodes']} seeds)",
        )
        ax.set_title(f"{label} ({mine[0]['sampler']})", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    sweep_cells.save_figure(fig, path, title)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    delays = sweep_cells.comma_list(args.delays, int)
    modes, methods = sweep_cells.comma_list(args.modes), sweep_cells.comma_list(args.rtc_methods)
    if set(modes) - set(MODES) or not delays or min(delays) < 0:
        raise SystemExit(
            f"--modes {args.modes!r} / --delays {args.delays!r}: modes from {MODES}, delays >= 0"
        )
    checkpoints, out, hardware = sweep_cells.start(args)
    cells = cells_for(checkpoints, delays, modes, methods)
    done_path = out / "cells.jsonl"
    done = sweep_cells.read_cells(done_path, cell_name)
    todo = [c for c in cells if cell_name(c) not in done]
    for i, cell in enumerate(todo):
        name = cell_name(cell)
        print(f"[{i + 1}/{len(todo)}] {name}: {args.n_test} test seeds ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        row = {**cell, **evaluate_cell(cell, args, out), "hardware": hardware}
        row["eval_s"] = round(time.perf_counter() - t0, 1)
        done[name] = row
        sweep_cells.append_cell(done_path, row)
        ci = sweep_cells.ci_text(row)
        print(
            f"{name}: {row['mean_score']:.3f} ({ci}) success {row['success_rate']:.3f}, {row['eval_s']} s",
            file=sys.stderr,
            flush=True,
        )
    rows = [done[cell_name(c)] for c in cells]
    print(f"{'cell':<30} {'score':>6} {'95% CI':>13} {'success':>8}")
    for r in rows:
        ci = sweep_cells.ci_text(r)
        print(f"{cell_name(r):<30} {r['mean_score']:>6.3f} {ci:>13} {r['success_rate']:>8.3f}")
    if not args.skip_latency:
        with tempfile.TemporaryDirectory() as tmp:
            latency = [
                row for label, path in checkpoints for row in time_backends(label, path, args, Path(tmp))
            ]
        (out / "latency.json").write_text(json.dumps({"hardware": hardware, "rows": latency}, indent=2))
        hz = f"D at {args.control_hz:g} Hz"
        print(f"\n{'checkpoint':<10} {'backend':<22} {'ms (b1)':>8} {hz:>10}")
        for r in latency:
            print(f"{r['ckpt']:<10} {r['backend']:<22} {r['ms_b1']:>8.2f} {r['delay']:>10}")
    if args.plot:
        plot(rows, args.plot, f"score against inference delay ({hardware})")
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
