"""Shared fixtures. Tests that need the PushT demonstrations fail (never skip) when it is missing.

Every test that reads them (through ``pusht_zarr_path``) carries ``@pytest.mark.needs_data``, so that
``python -m pytest -m "not needs_data"`` is a quick tier that runs without the dataset; a test that uses
the fixture without the marker fails, naming the marker.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.policy_helpers import pusht_data

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


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The tests' own torch work on one intra-op thread, as every script they start (helpers.ENV): the
    networks are tiny, and on a loaded 2-core machine a second thread spins against the other processes
    (600 steps of a small MLP: 4 s on one thread, 105 s on two beside a full run)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if "pusht_zarr_path" in item.fixturenames and item.get_closest_marker("needs_data") is None:
        pytest.fail(
            f"{item.nodeid} reads the PushT data (pusht_zarr_path) but lacks @pytest.mark.needs_data",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def pusht_zarr_path() -> str:
    path = find_pusht_zarr()
    if path is None:
        pytest.fail(
            "PushT dataset not found: set PUSHT_ZARR, or put pusht_cchi_v7_replay.zarr under data/pusht/ "
            "(see README, 'Data')."
        )
    return str(path)


@pytest.fixture(scope="session")
def lowdim_data(pusht_zarr_path):
    """(dataset, normalizer): 90 PushT state episodes, windows of policy_helpers.HORIZON."""
    return pusht_data(pusht_zarr_path)


@pytest.fixture(scope="session")
def image_data(pusht_zarr_path):
    """(dataset, normalizer): 2 PushT image episodes, windows of policy_helpers.HORIZON."""
    return pusht_data(pusht_zarr_path, image=True)
