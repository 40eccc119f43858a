"""import_dataset.py: robomimic hdf5 and LeRobotDataset files written from real PushT episodes import back to
the same arrays; malformed or partial sources stop with one line, exit code 2 and no output."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from diffusion_policy.dataset.importers.lerobot import open_lerobot
from diffusion_policy.dataset.importers.writer import write_episodes
from tests import format_fixtures as ff

REPO_ROOT = Path(__file__).resolve().parents[1]
N_EPISODES = 4
VALID = [1]
# AV1 (SVT-AV1, crf 30, yuv420p, 96x96), measured on these 4 episodes: mean |error| 0.74, 99th percentile 16,
# max 190 (single pixels on sharp coloured edges: 4:2:0 chroma subsampling); the bounds leave a margin
CODEC_MEAN_ABS = 1.5
CODEC_P99 = 24


def run_import(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "import_dataset.py", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def episodes(pusht_zarr_path):
    return ff.pusht_episodes(pusht_zarr_path, N_EPISODES)


@pytest.fixture(scope="module")
def robomimic_file(episodes, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("robomimic") / "pusht.hdf5"
    ff.write_robomimic(path, episodes, VALID)
    return path


@pytest.fixture(scope="module")
def lerobot_v3(episodes, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lerobot") / "pusht_v3"
    ff.write_lerobot_v3(root, episodes)
    return root


def stacked(episodes, key):
    return np.concatenate([ep[key] for ep in episodes])


def assert_one_line_exit_2(proc: subprocess.CompletedProcess, out: Path, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*")), "temporary output left behind"


@pytest.mark.needs_data
def test_robomimic_round_trip(robomimic_file, episodes, tmp_path):
    out = tmp_path / "rm.zarr"
    proc = run_import("--format", "robomimic", str(robomimic_file), "-o", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    root = zarr.open_group(str(out), mode="r")
    assert root.metadata.zarr_format == 2
    np.testing.assert_array_equal(
        root["meta/episode_ends"][:], np.cumsum([len(e["action"]) for e in episodes])
    )
    for key in ("image", "agent_pos", "keypoint", "action"):
        np.testing.assert_array_equal(root[f"data/{key}"][:], stacked(episodes, key))
    assert root["data/image"].dtype == np.uint8
    np.testing.assert_array_equal(root["meta/val_mask"][:], [i in VALID for i in range(N_EPISODES)])
    # the shape_meta block, printed and written next to the output
    block = (tmp_path / "rm.shape_meta.yaml").read_text()
    assert block in proc.stdout
    assert "    image:\n      shape: [3, 96, 96]\n      type: rgb" in block
    assert "    keypoint:\n      shape: [9, 2]\n      type: low_dim" in block
    assert "  action:\n    shape: [2]" in block
    again = run_import("--describe", str(out))
    assert again.returncode == 0 and block in again.stdout


@pytest.mark.needs_data
def test_lerobot_v3_round_trip(lerobot_v3, episodes, tmp_path):
    out = tmp_path / "lr.zarr"
    proc = run_import("--format", "lerobot", str(lerobot_v3), "-o", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "observation.image -> image" in proc.stdout and "observation.state -> state" in proc.stdout
    root = zarr.open_group(str(out), mode="r")
    np.testing.assert_array_equal(
        root["meta/episode_ends"][:], np.cumsum([len(e["action"]) for e in episodes])
    )
    np.testing.assert_array_equal(root["data/state"][:], stacked(episodes, "agent_pos"))
    np.testing.assert_array_equal(root["data/action"][:], stacked(episodes, "action"))
    decoded = root["data/image"][:].astype(np.int16)
    original = stacked(episodes, "image").astype(np.int16)
    err = np.abs(decoded - original)
    assert err.mean() < CODEC_MEAN_ABS and np.percentile(err, 99) < CODEC_P99, (
        err.mean(),
        np.percentile(err, 99),
    )
    # every frame is its own row's frame, not a neighbour's (the agent moves between frames)
    shifted = np.abs(decoded[1:] - original[:-1]).mean(axis=(1, 2, 3))
    assert np.mean(err[1:].mean(axis=(1, 2, 3)) < shifted) > 0.9
    assert "meta" in root and "val_mask" not in root["meta"]  # info.json has only a train split


@pytest.mark.needs_data
def test_lerobot_v21_reads_per_episode_files(episodes, tmp_path):
    root = tmp_path / "pusht_v21"
    ff.write_lerobot_v21(root, episodes[:2])
    buffer = write_episodes(open_lerobot(root), tmp_path / "v21.zarr")
    assert buffer.n_episodes == 2
    np.testing.assert_array_equal(buffer["action"][:], stacked(episodes[:2], "action"))
    err = np.abs(buffer["image"][:].astype(np.int16) - stacked(episodes[:2], "image"))
    assert err.mean() < CODEC_MEAN_ABS


@pytest.mark.needs_data
def test_lerobot_png_image_feature(episodes, tmp_path):
    """An ``image`` feature (PNG bytes in the table, LeRobot's images without video) imports exactly."""
    import io
    import json

    import pyarrow as pa
    from PIL import Image

    root = tmp_path / "png"
    ff.write_lerobot_v3(root, episodes[:1])
    table_path = root / "data" / "chunk-000" / "file-000.parquet"
    cells = []
    for img in episodes[0]["image"]:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        cells.append({"bytes": buf.getvalue(), "path": None})
    table = pq.read_table(table_path)
    pq.write_table(table.append_column("observation.top", pa.array(cells)), table_path)
    info = json.loads((root / "meta" / "info.json").read_text())
    info["features"]["observation.top"] = {
        "dtype": "image",
        "shape": [96, 96, 3],
        "names": ["height", "width", "channel"],
    }
    (root / "meta" / "info.json").write_text(json.dumps(info))
    source = open_lerobot(root, ["observation.top", "observation.state"])
    buffer = write_episodes(source, tmp_path / "png.zarr")
    np.testing.assert_array_equal(buffer["top"][:], episodes[0]["image"])


@pytest.mark.needs_data
def test_existing_output_needs_overwrite(robomimic_file, tmp_path):
    out = tmp_path / "exists.zarr"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = run_import("--format", "robomimic", str(robomimic_file), "-o", str(out))
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert (out / "keep.txt").read_text() == "mine"
    proc = run_import("--format", "robomimic", str(robomimic_file), "-o", str(out), "--overwrite")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (out / "keep.txt").exists() and (out / "data" / "action").exists()


# ---------------------------------------------------------------- malformed and partial sources
def _without_an_obs_key(bad: Path, good: Callable[[], Path]) -> str:
    bad.write_bytes(good().read_bytes())
    with h5py.File(bad, "a") as f:
        del f["data/demo_2/obs/agent_pos"]
    return "data/demo_2/obs/agent_pos is missing"


def _truncated(bad: Path, good: Callable[[], Path]) -> str:
    data = good().read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    return str(bad)


def _not_hdf5(bad: Path, good: Callable[[], Path]) -> str:
    bad.write_text("not an hdf5 file\n")
    return "not a readable HDF5 file"


@pytest.mark.parametrize(
    "make_bad",
    [
        pytest.param(_without_an_obs_key, marks=pytest.mark.needs_data, id="missing_obs_key"),
        pytest.param(_truncated, marks=pytest.mark.needs_data, id="truncated_file"),
        pytest.param(_not_hdf5, id="not_hdf5"),
    ],
)
def test_robomimic_bad_source_is_one_line_exit_2(make_bad, request, tmp_path):
    """``make_bad`` writes the bad file (from the good one, built only when it needs it: that needs the
    PushT data) and returns what the error line must name."""
    bad = tmp_path / "bad.hdf5"
    needle = make_bad(bad, lambda: request.getfixturevalue("robomimic_file"))
    out = tmp_path / "o.zarr"
    assert_one_line_exit_2(run_import("--format", "robomimic", str(bad), "-o", str(out)), out, needle)


@pytest.mark.needs_data
def test_lerobot_video_shorter_than_table(episodes, tmp_path):
    root = tmp_path / "short_video"
    frames = [ep["image"] for ep in episodes[:2]]
    frames[-1] = frames[-1][:-5]  # the last episode's video lacks its last 5 frames
    ff.write_lerobot_v3(root, episodes[:2], video_frames=frames)
    out = tmp_path / "o.zarr"
    proc = run_import("--format", "lerobot", str(root), "-o", str(out))
    assert_one_line_exit_2(proc, out, "shorter than its table", "episode 1")


@pytest.mark.needs_data
def test_lerobot_missing_feature_and_column(lerobot_v3, episodes, tmp_path):
    out = tmp_path / "o.zarr"
    proc = run_import(
        "--format", "lerobot", str(lerobot_v3), "-o", str(out), "--obs-keys", "observation.depth"
    )
    assert_one_line_exit_2(proc, out, "feature 'observation.depth' is missing")
    # a table without the action column its info.json promises
    root = tmp_path / "no_action"
    ff.write_lerobot_v3(root, episodes[:1])
    table_path = root / "data" / "chunk-000" / "file-000.parquet"
    pq.write_table(pq.read_table(table_path).drop_columns(["action"]), table_path)
    proc = run_import("--format", "lerobot", str(root), "-o", str(out))
    assert_one_line_exit_2(proc, out, "column 'action' is missing", "file-000.parquet")
