"""Command-line arguments the scripts share (eval.py, export.py, convert_checkpoint.py, import_dataset.py),
declared once so that their spelling, aliases and meaning cannot drift apart between scripts."""

from __future__ import annotations

import argparse


def add_checkpoint_and_output_dir(
    parser: argparse.ArgumentParser, checkpoint_help: str, output_help: str
) -> None:
    """``-c/--checkpoint`` and ``-o/--output-dir`` (also ``--output_dir``, the original's spelling), both
    required."""
    parser.add_argument("-c", "--checkpoint", required=True, help=checkpoint_help)
    parser.add_argument(
        "-o", "--output-dir", "--output_dir", dest="output_dir", required=True, help=output_help
    )


def add_overwrite(parser: argparse.ArgumentParser, what_is_replaced: str) -> None:
    """``--overwrite``: an existing output is refused unless it is given; ``what_is_replaced`` says what then
    happens to it."""
    parser.add_argument("--overwrite", action="store_true", help=what_is_replaced)
