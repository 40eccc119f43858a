"""Import demonstrations from robomimic or LeRobot files into a ReplayBuffer zarr this framework trains on.

    python import_dataset.py --format robomimic low_dim.hdf5 -o data/lift.zarr
    python import_dataset.py --format lerobot path/to/lerobot_dataset -o data/my_robot.zarr
    python import_dataset.py --describe data/my_demos.zarr       # the shape_meta of an existing zarr

The output has the original's layout (``data/<key>``, ``meta/episode_ends``, zarr format 2) and, when the
source has a validation split, ``meta/val_mask``. The ``shape_meta`` block to paste into a task config is
printed and written next to the output (``OUT.shape_meta.yaml``). A malformed or partial source stops with
one line naming what is missing, exit code 2, and no output.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from diffusion_policy.common.cli_args import add_overwrite
from diffusion_policy.dataset.importers.writer import (
    SourceError,
    shape_meta_of,
    shape_meta_yaml,
    write_episodes,
)

EXIT_BAD_INPUT = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Formats: robomimic hdf5 (data/demo_<i>/obs/<key>, actions, mask/valid -> the validation "
        "split); LeRobotDataset v2.0, v2.1 and v3.0 directories (meta/info.json, parquet, mp4 videos). "
        "See README, 'Train on your own data'.",
    )
    parser.add_argument("source", metavar="SRC", help="robomimic .hdf5 file or LeRobotDataset directory")
    parser.add_argument("--format", choices=("robomimic", "lerobot"), help="what SRC is")
    parser.add_argument("-o", "--output", metavar="OUT.zarr", help="zarr directory to create")
    parser.add_argument(
        "--obs-keys",
        metavar="K1,K2",
        help="observations to import, comma-separated (robomimic obs keys, LeRobot feature names); "
        "default: all (LeRobot: every observation.* feature)",
    )
    parser.add_argument(
        "--action-key",
        metavar="K",
        help="action dataset / feature (default: robomimic 'actions', LeRobot 'action')",
    )
    add_overwrite(parser, "replace OUT.zarr if it exists")
    parser.add_argument(
        "--describe", action="store_true", help="print the shape_meta of SRC, an existing ReplayBuffer zarr"
    )
    args = parser.parse_args(argv)
    if not args.describe and (args.format is None or args.output is None):
        parser.error("--format and -o/--output are required (or --describe to read a zarr)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.describe:
            from diffusion_policy.common.replay_buffer import ReplayBuffer

            try:
                buffer = ReplayBuffer.create_from_path(args.source, mode="r")
            except (FileNotFoundError, ValueError) as e:
                raise SourceError(str(e)) from None
            print(f"# {args.source}: {buffer.n_episodes} episodes, {buffer.n_steps} steps")
            print(shape_meta_yaml(shape_meta_of(buffer)), end="")
            return 0
        obs_keys = [k for k in args.obs_keys.split(",") if k] if args.obs_keys else None
        if args.format == "robomimic":
            from diffusion_policy.dataset.importers.robomimic import open_robomimic

            source = open_robomimic(args.source, obs_keys, args.action_key or "actions")
        else:
            from diffusion_policy.dataset.importers.lerobot import open_lerobot

            source = open_lerobot(args.source, obs_keys, args.action_key or "action")
        out = Path(args.output)
        buffer = write_episodes(source, out, overwrite=args.overwrite)
    except (SourceError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    yaml_text = shape_meta_yaml(shape_meta_of(buffer))
    yaml_path = out.with_name(out.name.removesuffix(".zarr") + ".shape_meta.yaml")
    tmp = yaml_path.with_name(f".{yaml_path.name}.tmp-{os.getpid()}")
    tmp.write_text(yaml_text)
    os.replace(tmp, yaml_path)
    split = (
        ""
        if source.val_mask is None
        else f", {int(source.val_mask.sum())} of them in the file's validation split"
    )
    print(f"wrote {out}: {buffer.n_episodes} episodes, {buffer.n_steps} steps{split}")
    renamed = {k: v for k, v in source.key_names.items() if k != v}
    if renamed:
        print("keys: " + ", ".join(f"{k} -> {v}" for k, v in renamed.items()))
    print(f"paste into your task config (also in {yaml_path}):\n")
    print(yaml_text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
