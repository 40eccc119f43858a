"""Convert a checkpoint written by the original Diffusion Policy code into this framework's format.

    python convert_checkpoint.py epoch=0550-test_mean_score=0.969.ckpt data/converted/pusht_state.ckpt
    python eval.py -c data/converted/pusht_state.ckpt -o data/eval/pusht_state

The original's files are dill pickles, which can run arbitrary code when loaded. This reads them with an
allowlist of data-rebuilding globals only (see diffusion_policy/common/legacy_checkpoint.py) and refuses
anything else, so converting a file you did not write is safe; it needs neither dill nor the original code.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from diffusion_policy.common.cli_args import add_overwrite
from diffusion_policy.common.errors import CheckpointError, ConfigError, one_line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="convert_checkpoint.py",
        description="Read a checkpoint written by the original Diffusion Policy code (torch.save with dill) "
        "without running anything from it, and write it as this framework's checkpoint: config, model, EMA "
        "model, optimizer, epoch and global step. The LR-schedule position, EMA step counter, top-k "
        "ranking and RNG, which the original does not save, are rebuilt as a fresh run at that epoch would "
        "have them. "
        "The result works with eval.py, load_policy and train.py training.resume=True (fine-tuning).",
        epilog="Example: python convert_checkpoint.py epoch=0550-test_mean_score=0.969.ckpt "
        "data/outputs/finetune/checkpoints/latest.ckpt  (then: python train.py "
        "hydra.run.dir=data/outputs/finetune training.resume=True training.num_epochs=600)",
    )
    parser.add_argument("original", metavar="ORIGINAL.ckpt", help="checkpoint written by the original code")
    parser.add_argument("output", metavar="OUT.ckpt", help="where to write the converted checkpoint")
    add_overwrite(parser, "replace OUT.ckpt if it exists (default: refuse)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    src, out = Path(args.original), Path(args.output)
    if not src.is_file():
        print(f"error: checkpoint {src} does not exist", file=sys.stderr)
        return 2
    if out.exists() and (out.is_dir() or not args.overwrite):
        what = "is a directory" if out.is_dir() else "exists; pass --overwrite to replace it"
        print(f"error: output {out} {what}", file=sys.stderr)
        return 2
    if out.exists() and out.resolve() == src.resolve():
        print(
            f"error: output {out} is the input file; write the converted checkpoint elsewhere",
            file=sys.stderr,
        )
        return 2
    try:
        from diffusion_policy.common.legacy_checkpoint import convert_checkpoint_file

        result = convert_checkpoint_file(src, out)
    except (CheckpointError, ConfigError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write {out}: {one_line(e)}", file=sys.stderr)
        return 2
    print(
        f"converted {src} ({result.workspace.rsplit('.', 1)[-1]}, original epoch={result.original_epoch} "
        f"global_step={result.original_global_step}) -> {result.output} (epoch {result.epoch} completed, "
        f"global step {result.global_step})"
    )
    print(result.rebuilt)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("WANDB_SILENT", "true")
    sys.exit(main())
