"""A test-only handshake: hold a training run at the start of one epoch until the test lets it go.

Tests that stop a run part-way (SIGINT, SIGTERM, SIGKILL, then resume) must stop it at a known epoch
however loaded the machine is, so they never race the run with a clock. With ``DP_HOLD_AT_EPOCH=<n>`` and
``DP_HOLD_DIR=<dir>`` in its environment, a run that reaches epoch n (epoch n-1's checkpoint written)
creates ``<dir>/held_at_epoch_<n>`` and waits until ``<dir>/release`` exists or a stop signal arrives.
Without those variables (every real run) it does nothing. It draws no random numbers, so a held run
trains exactly as one that was never held.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from diffusion_policy.common import shutdown

HOLD_AT_EPOCH = "DP_HOLD_AT_EPOCH"
HOLD_DIR = "DP_HOLD_DIR"


def held_marker(hold_dir: Path, epoch: int) -> Path:
    """The file a run creates once it is held at ``epoch``."""
    return Path(hold_dir) / f"held_at_epoch_{epoch}"


def hold_if_asked(epoch: int) -> None:
    """Called by the training loop at the start of every epoch."""
    at, hold_dir = os.environ.get(HOLD_AT_EPOCH), os.environ.get(HOLD_DIR)
    if at is None or hold_dir is None or int(at) != epoch:
        return
    held_marker(Path(hold_dir), epoch).touch()
    release = Path(hold_dir) / "release"
    while not release.exists() and shutdown.requested() is None:
        time.sleep(0.01)
