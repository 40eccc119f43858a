"""Shared fixtures. Tests that need the PushT demonstrations fail (never skip) when it is missing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

REPO_ROOT = Path(__file__).resolve().parents[1]
ZARR_RELPATH = Path("pusht") / "pusht_cchi_v7_replay.zarr"


def find_pusht_zarr() -> Path | None:
    candidates = []
    if os.environ.get("PUSHT_ZARR"):
        candidates.append(Path(os.environ["PUSHT_ZARR"]))
    candidates += [REPO_ROOT / "data" / ZARR_RELPATH, REPO_ROOT.parent / "shared" / "data" / ZARR_RELPATH]
    for c in candidates:
        if (c / "meta" / "episode_ends").exists() or (c / "meta" / "episode_ends" / "zarr.json").exists():
            return c.resolve()
        if (c / ".zgroup").exists():
            return c.resolve()
    return None


@pytest.fixture(scope="session")
def pusht_zarr_path() -> str:
    path = find_pusht_zarr()
    if path is None:
        pytest.fail(
            "PushT dataset not found: set PUSHT_ZARR, or put pusht_cchi_v7_replay.zarr under data/pusht/ "
            "(see README, 'Data')."
        )
    return str(path)
