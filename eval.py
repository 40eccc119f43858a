"""Evaluate a checkpoint in simulation: rebuild its policy and env runner from the checkpoint alone.

    python eval.py -c data/outputs/.../checkpoints/latest.ckpt -o data/eval/run1 [-d cpu] [--overwrite]
    python eval.py -c CKPT -o data/eval/run1_ddpm --sampler ddpm      # same weights, 100-step DDPM sampling

Writes OUTPUT_DIR/eval_log.json (metrics, and video paths under OUTPUT_DIR/media/). Rollout settings (seeds,
number of episodes, ...) are the checkpoint's own task.env_runner config.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from diffusion_policy.common.config_resolvers import register_resolvers
from diffusion_policy.common.errors import CheckpointError, ConfigError, DeviceError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="eval.py",
        description="Roll out the policy stored in a training checkpoint with the env runner from its config "
        "and write OUTPUT_DIR/eval_log.json plus rollout videos (OUTPUT_DIR/media/*.mp4).",
        epilog="Example: python eval.py -c data/outputs/2025.01.01/12.00.00_train_diffusion_unet_lowdim_"
        "pusht_lowdim/checkpoints/latest.ckpt -o data/eval/pusht_lowdim -d cpu",
    )
    parser.add_argument(
        "-c", "--checkpoint", required=True, help="checkpoint file (.ckpt) written by train.py"
    )
    parser.add_argument(
        "-o",
        "--output_dir",
        "--output-dir",
        dest="output_dir",
        required=True,
        help="directory for eval_log.json and videos; must be empty or missing unless --overwrite",
    )
    parser.add_argument(
        "-d", "--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default: auto)"
    )
    parser.add_argument(
        "--sampler",
        choices=("ddpm", "ddim"),
        default=None,
        help="sample with this scheduler over the checkpoint's trained noise schedule instead of the one it "
        "was trained with (DDPM: all 100 steps unless --inference-steps; DDIM: its steps unless given)",
    )
    parser.add_argument(
        "--inference-steps",
        type=int,
        default=None,
        metavar="N",
        help="number of denoising steps for sampling (default: the checkpoint's, or all for --sampler ddpm)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into OUTPUT_DIR even if it is not empty (never prompts)",
    )
    return parser.parse_args(argv)


def evaluate(
    checkpoint: str,
    output_dir: str,
    device: str = "auto",
    payload: dict | None = None,
    sampler: str | None = None,
    inference_steps: int | None = None,
) -> dict:
    import torch

    from diffusion_policy.common.device_util import resolve_device
    from diffusion_policy.policy.diffusion_sampling import sampler_label, use_sampler
    from diffusion_policy.workspace.base_workspace import load_policy
    from diffusion_policy.workspace.train_diffusion_workspace import build

    torch_device = resolve_device(device)
    policy, cfg = load_policy(checkpoint, torch_device, payload=payload)
    if sampler is not None or inference_steps is not None:
        try:
            use_sampler(policy, sampler, inference_steps)
        except ValueError as e:
            raise ConfigError(f"--sampler/--inference-steps: {e}") from None

    # created only now: a checkpoint that fails above leaves no trace
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    env_runner = build(cfg.task.env_runner, "task.env_runner", output_dir=output_dir)
    try:
        with torch.no_grad():
            runner_log = env_runner.run(policy)
    finally:
        if hasattr(env_runner, "close"):
            env_runner.close()
    json_log = {
        k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v))
        for k, v in runner_log.items()
    }
    json_log["eval/sampler"] = sampler_label(policy)
    with open(Path(output_dir) / "eval_log.json", "w") as f:
        json.dump(json_log, f, indent=2, sort_keys=True)
    return json_log


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    register_resolvers()
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        print(f"error: output dir {out} exists and is not a directory", file=sys.stderr)
        return 2
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        print(f"error: output dir {out} is not empty; pass --overwrite or choose another -o", file=sys.stderr)
        return 2
    if not Path(args.checkpoint).is_file():
        print(f"error: checkpoint {args.checkpoint} does not exist", file=sys.stderr)
        return 2
    try:
        from diffusion_policy.common.checkpoint_io import load_checkpoint_file
        from diffusion_policy.common.device_util import resolve_device

        resolve_device(args.device)
        payload = load_checkpoint_file(args.checkpoint)
        log = evaluate(args.checkpoint, str(out), args.device, payload, args.sampler, args.inference_steps)
    except (CheckpointError, ConfigError, DeviceError, FileNotFoundError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    scores = {
        k: v for k, v in log.items() if k.endswith(("mean_score", "success_rate")) or k == "eval/sampler"
    }
    print(json.dumps(scores, indent=2, sort_keys=True))
    print(f"wrote {out / 'eval_log.json'}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("WANDB_SILENT", "true")
    sys.exit(main())
