"""Export a trained policy for deployment: ONNX graphs, OpenVINO IR and a manifest, run without torch.

    python export.py -c data/outputs/.../checkpoints/latest.ckpt -o data/export/pusht_state
    python export.py -c CKPT -o DIR --format onnx          # ONNX only
    python eval.py -c DIR -o data/eval/exported --backend openvino

Then, in a process without torch::

    from diffusion_policy.deploy import load_exported_policy
    policy = load_exported_policy("data/export/pusht_state", backend="openvino")
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from diffusion_policy.common.cli_args import add_checkpoint_and_output_dir, add_overwrite

INSTALL_HINT = 'pip install -e ".[export]"  (onnx, onnxruntime, openvino)'


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="export.py",
        description="Export the policy in a training checkpoint (EMA weights, eval mode) to an export "
        "directory: the denoiser (and, for image policies, the observation encoder) as ONNX graphs and "
        "OpenVINO IR, plus manifest.json (normalizer, shapes, action window, noise schedule, sampler, the "
        "checkpoint's resolved config). Load it with diffusion_policy.deploy.load_exported_policy(DIR) "
        "or score it with eval.py -c DIR --backend openvino|onnxruntime.",
        epilog="Example: python export.py -c data/outputs/run/checkpoints/latest.ckpt -o data/export/run",
    )
    add_checkpoint_and_output_dir(
        parser,
        checkpoint_help="checkpoint file (.ckpt) written by train.py",
        output_help="export directory to create (written to a temporary directory, then renamed into place)",
    )
    parser.add_argument(
        "--format",
        nargs="+",
        default=["onnx", "openvino"],
        metavar="FMT",
        help="what to write: onnx, openvino or both (default: both; OpenVINO IR is converted from ONNX)",
    )
    add_overwrite(parser, "replace OUTPUT_DIR if it holds a previous export (never anything else)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    formats = sorted(set(args.format))
    bad = [f for f in formats if f not in ("onnx", "openvino")]
    if bad:
        print(f"error: unsupported --format {' '.join(bad)}; choose from onnx, openvino", file=sys.stderr)
        return 2
    needed = ["onnx"] + (["openvino"] if "openvino" in formats else [])
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        print(f"error: export needs {', '.join(missing)}; install with: {INSTALL_HINT}", file=sys.stderr)
        return 2
    from diffusion_policy.common.errors import CheckpointError, ConfigError, one_line
    from diffusion_policy.deploy.exporter import export_checkpoint
    from diffusion_policy.deploy.manifest import ExportError

    try:
        manifest = export_checkpoint(args.checkpoint, args.output_dir, tuple(formats), args.overwrite)
    except (ExportError, CheckpointError, ConfigError, FileNotFoundError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    graphs = ", ".join(sorted(manifest["graphs"]))
    print(
        f"exported {manifest['policy_class'].rsplit('.', 1)[-1]} ({graphs}; {' + '.join(formats)}; "
        f"{manifest['sampler']['class']}-{manifest['sampler']['num_inference_steps']}) to {args.output_dir}"
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("WANDB_SILENT", "true")
    sys.exit(main())
