"""What the evaluation sweeps (``sampler_sweep``, ``realtime_sweep``) share: their start-up, the
``LABEL=PATH`` checkpoint arguments, the resumable ``cells.jsonl`` and the test-score keys of a cell."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.measure import set_threads
from benchmarks.recipes import headless_env
from diffusion_policy.common.host_info import cpu_model_name

# the eval_log.json keys (under "test/") a sweep keeps per cell
TEST_KEYS = (
    "mean_score",
    "mean_score_ci95_low",
    "mean_score_ci95_high",
    "success_rate",
    "success_rate_ci95_low",
    "success_rate_ci95_high",
    "n_episodes",
    "first_seed",
    "last_seed",
)


def start(args: argparse.Namespace) -> tuple[list[tuple[str, str]], Path, str]:
    """Headless rendering, the config resolvers and the thread count; -> (checkpoints (label, path), the
    output directory (created), the hardware string rows carry)."""
    from diffusion_policy.common.config_resolvers import register_resolvers

    headless_env()
    register_resolvers()
    set_threads(args.threads)
    checkpoints = []
    for item in args.ckpt:
        label, sep, path = item.partition("=")
        if not sep or not label or not Path(path).is_file():
            raise SystemExit(f"--ckpt {item!r}: expected LABEL=PATH to an existing checkpoint file")
        checkpoints.append((label, path))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hardware = f"{cpu_model_name()}, torch {torch.__version__}, torch threads: {torch.get_num_threads()}"
    return checkpoints, out, hardware


def read_cells(path: Path, name: Callable[[dict[str, Any]], str]) -> dict[str, dict[str, Any]]:
    """The rows already in ``cells.jsonl``, by cell name (an interrupted sweep continues from them)."""
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done[name(row)] = row
    return done


def append_cell(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def kept_test_scores(log: dict[str, Any]) -> dict[str, Any]:
    """The kept test metrics of one eval log."""
    return {k: log[f"test/{k}"] for k in TEST_KEYS}


def ci_text(row: dict[str, Any]) -> str:
    return f"{row['mean_score_ci95_low']:.3f}-{row['mean_score_ci95_high']:.3f}"


def save_figure(fig: Any, path: str | Path, title: str) -> None:
    """Title, tight layout and a PNG at ``path`` (its directory created)."""
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def comma_list(text: str, cast: Callable[[str], Any] = str) -> list[Any]:
    """``"0, 1,2"`` -> [0, 1, 2] with ``cast=int``; empty items are skipped."""
    return [cast(item.strip()) for item in text.split(",") if item.strip()]
