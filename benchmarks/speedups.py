"""What the cheap speed choices buy, each measured against the way the original code does it.

    python -m benchmarks.speedups data/outputs/RUN/checkpoints/latest.ckpt [--only eval,loader] [--out F]

Give it a trained checkpoint: with a policy that solves episodes, they end early, as they do in training,
and that is where skipping finished episodes pays. The policy, its sampler and the evaluation protocol are
the checkpoint's own (``task.env_runner``: 6 train + 50 test episodes of at most 300 steps).

Evaluation variants (same runner, same episodes, ``runner.run`` timed after the workers are up):
  eval.shipped        as train.py and eval.py run it: one batched ``predict_action`` per control step over
                      the episodes still running, with the checkpoint's sampler
  eval.keep_finished  every call samples for all episodes, finished ones included, as the original's vector
                      env does until its last episode ends
  eval.per_episode    one ``predict_action`` call per running episode: no batching across episodes
  eval.ddpm100        the checkpoint's noise schedule sampled with DDPM and 100 steps, the paper's sampler
Training data path (the checkpoint's recipe as its workspace trains it: dataset, network, batch size,
optimizer, LR schedule and EMA, with fresh weights, which the speed does not depend on):
  loader.workers0     dataset in memory, batches built in the training process (the CPU recipe's setting)
  loader.workers1     one loader worker process, started again every epoch (the original's state recipe)

Each result is one JSON line ``{name, value, unit, config, hardware}`` as in ``run.py``; ``config.speedup``
compares a variant's wall time with the shipped one (``>1``: the shipped way is faster).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.measure import Recorder, TimedPolicy, hardware_string, log, set_threads, sync
from benchmarks.recipes import SEED, RecipeTraining, cli_device, headless_env
from diffusion_policy.common.config_resolvers import register_resolvers
from diffusion_policy.common.pytorch_util import seed_everything
from diffusion_policy.policy.samplers import sampler_label, use_sampler

GROUPS = ("eval", "loader")


def bench_eval(policy: Any, cfg: Any, device: torch.device, rec: Recorder, workdir: Path) -> None:
    from diffusion_policy.workspace.train_diffusion_workspace import build

    runner = build(cfg.task.env_runner, "task.env_runner", output_dir=str(workdir / "eval"))
    n_episodes = int(cfg.task.env_runner.n_train) + int(cfg.task.env_runner.n_test)
    shipped_sampler = sampler_label(policy)
    ddpm = copy.copy(policy)  # shares the weights; only the sampler differs
    ddpm_sampler = use_sampler(ddpm, "ddpm")
    variants = {
        "shipped": (TimedPolicy(policy, device), shipped_sampler),
        "keep_finished": (TimedPolicy(policy, device, "pad", pad_to=n_episodes), shipped_sampler),
        "per_episode": (TimedPolicy(policy, device, "per_row"), shipped_sampler),
        "ddpm100": (TimedPolicy(ddpm, device), ddpm_sampler),
    }
    shipped_s = None
    try:
        t0 = time.perf_counter()
        runner.start()
        started = time.perf_counter() - t0
        log(f"eval: {n_episodes} episodes, {runner.n_envs} env workers started in {started:.1f}s")
        for name, (timed, sampler) in variants.items():
            seed_everything(SEED)
            t0 = time.perf_counter()
            with torch.inference_mode():
                result = runner.run(timed)
            wall = time.perf_counter() - t0
            shipped_s = wall if name == "shipped" else shipped_s
            config = {
                "checkpoint_recipe": str(cfg.get("name", "")),
                "sampler": sampler,
                "episodes": n_episodes,
                "n_envs": runner.n_envs,
                "policy_calls": timed.calls,
                "sampled_rows": timed.rows,
                "policy_seconds": round(timed.seconds, 3),
                "test_mean_score": round(float(result["test/mean_score"]), 4),
                "test_success_rate": round(float(result["test/success_rate"]), 4),
                "speedup": round(wall / shipped_s, 3) if shipped_s else None,
                "device": str(device),
            }
            log(
                f"eval.{name}: {wall:.1f}s, {timed.calls} calls, {timed.rows} rows, "
                f"test/mean_score {config['test_mean_score']}"
            )
            rec.emit(f"eval.{name}.wall_time", wall, "s", config)
    finally:
        runner.close()


def bench_loader(cfg: Any, device: torch.device, rec: Recorder, steps: int, workdir: Path) -> None:
    from hydra.utils import instantiate

    t0 = time.perf_counter()
    dataset = instantiate(cfg.task.dataset)
    log(f"loader: dataset of {len(dataset)} windows loaded in {time.perf_counter() - t0:.1f}s")
    shipped_s = None
    for workers in (0, 1):
        changes = {"num_workers": workers, "persistent_workers": False}
        training, loader = RecipeTraining.build(cfg, dataset, device, workdir / f"loader{workers}", changes)
        n_epochs_started = data_wait = 0
        it = None
        sync(device)
        t_start = time.perf_counter()
        for _ in range(steps):
            t0 = time.perf_counter()
            batch = next(it, None) if it is not None else None
            if batch is None:
                # a new epoch: with persistent_workers=False this starts the worker process again
                it = iter(loader)
                n_epochs_started += 1
                batch = next(it)
            data_wait += time.perf_counter() - t0
            training.step(batch).item()
        sync(device)
        wall = time.perf_counter() - t_start
        shipped_s = wall if workers == 0 else shipped_s
        config = {
            "batch_size": loader.batch_size,
            "num_workers": workers,
            "persistent_workers": False,
            "steps": steps,
            "epochs_started": n_epochs_started,
            "batches_per_epoch": len(loader),
            "data_wait_share": round(data_wait / wall, 4),
            "speedup": round(wall / shipped_s, 3),
            "device": str(device),
        }
        log(f"loader.workers{workers}: {steps / wall:.2f} steps/s, data wait {config['data_wait_share']:.1%}")
        rec.emit(f"loader.workers{workers}.optimizer_steps_per_s", steps / wall, "steps/s", config)
        del loader, it


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a trained checkpoint (.ckpt) written by train.py")
    p.add_argument("--only", default=None, help=f"comma-separated subset of: {','.join(GROUPS)}")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda:0 (default: auto)")
    p.add_argument("--loader-steps", type=int, default=120, help="optimizer steps per loader variant")
    p.add_argument("--out", default=None, help="also write the JSON lines to this file")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    headless_env()
    args = parse_args(argv)
    groups = [g.strip() for g in (args.only or ",".join(GROUPS)).split(",") if g.strip()]
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        raise SystemExit(f"--only: unknown group(s) {unknown}; choose from {list(GROUPS)}")
    if args.loader_steps < 1:
        raise SystemExit(f"--loader-steps must be >= 1, got {args.loader_steps}")
    if not Path(args.checkpoint).is_file():
        raise SystemExit(f"checkpoint {args.checkpoint} does not exist; pass a .ckpt written by train.py")
    set_threads(args.threads)
    register_resolvers()
    from diffusion_policy.workspace.base_workspace import load_policy

    device = cli_device(args.device)
    policy, cfg = load_policy(args.checkpoint, device)
    rec = Recorder(hardware_string(device), args.out)
    log(f"checkpoint {args.checkpoint}; hardware: {rec.hardware}")
    try:
        with tempfile.TemporaryDirectory(prefix="dp_speedups_") as tmp:
            if "eval" in groups:
                bench_eval(policy, cfg, device, rec, Path(tmp))
            if "loader" in groups:
                bench_loader(cfg, device, rec, args.loader_steps, Path(tmp))
    finally:
        rec.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
