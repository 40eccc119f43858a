"""Test fixtures in other projects' file formats, written from PushT episodes with h5py, pyarrow and PyAV.

They follow each format's published layout and share no code with ``diffusion_policy.dataset.importers``,
so a round trip through the importer checks the reader against the format, not against itself.

- robomimic: ``data`` (attrs ``total``, ``env_args``), ``data/demo_<i>/{actions, obs/<key>}`` with attr
  ``num_samples``, ``mask/train`` and ``mask/valid`` as byte strings of demo names.
- LeRobotDataset v3.0: ``meta/info.json``, ``meta/tasks.parquet``,
  ``meta/episodes/chunk-000/file-000.parquet``, ``data/chunk-000/file-000.parquet`` (all episodes),
  ``videos/<key>/chunk-000/file-000.mp4`` (all episodes back to back, AV1 yuv420p as LeRobot encodes them).
- LeRobotDataset v2.1: ``meta/info.json``, ``meta/episodes.jsonl``, ``meta/tasks.jsonl``, one
  ``data/chunk-000/episode_<i>.parquet`` and one ``videos/chunk-000/<key>/episode_<i>.mp4`` per episode.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FPS = 10
IMAGE_KEY = "observation.image"
STATE_KEY = "observation.state"


def pusht_episodes(zarr_path: str, n: int) -> list[dict[str, np.ndarray]]:
    """The first ``n`` PushT episodes: image (uint8 HWC), agent_pos (state[:, :2]), keypoint, action."""
    import zarr

    root = zarr.open_group(zarr_path, mode="r")
    ends = root["meta/episode_ends"][:n]
    out, start = [], 0
    for end in ends:
        sl = slice(start, int(end))
        out.append(
            {
                "image": root["data/img"][sl].astype(np.uint8),
                "agent_pos": root["data/state"][sl][:, :2].astype(np.float32),
                "keypoint": root["data/keypoint"][sl].astype(np.float32),
                "action": root["data/action"][sl].astype(np.float32),
            }
        )
        start = int(end)
    return out


def write_robomimic(path: Path, episodes: list[dict], valid: list[int]) -> None:
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["total"] = sum(len(e["action"]) for e in episodes)
        data.attrs["env_args"] = json.dumps({"env_name": "PushT", "type": 1, "env_kwargs": {}})
        for i, ep in enumerate(episodes):
            demo = data.create_group(f"demo_{i}")
            demo.attrs["num_samples"] = len(ep["action"])
            demo.create_dataset("actions", data=ep["action"])
            demo.create_dataset("rewards", data=np.zeros(len(ep["action"])))
            obs = demo.create_group("obs")
            for key in ("image", "agent_pos", "keypoint"):
                obs.create_dataset(key, data=ep[key], compression="gzip" if key == "image" else None)
        names = [f"demo_{i}" for i in range(len(episodes))]
        f.create_dataset("mask/valid", data=np.array([names[i] for i in valid], dtype="S"))
        f.create_dataset(
            "mask/train", data=np.array([n for i, n in enumerate(names) if i not in valid], dtype="S")
        )


def encode_video(path: Path, frames: np.ndarray, codec: str = "libsvtav1") -> None:
    """RGB uint8 (T, H, W, 3) -> mp4 at FPS, frame i at i / FPS seconds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=FPS)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, FPS)
        stream.options = {"crf": "30", "g": "2"} if codec == "libsvtav1" else {"crf": "18"}
        for i, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, FPS)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _features(h: int, w: int) -> dict:
    return {
        IMAGE_KEY: {
            "dtype": "video",
            "shape": [h, w, 3],
            "names": ["height", "width", "channels"],
            "info": {"video.fps": FPS, "video.codec": "av1", "video.pix_fmt": "yuv420p"},
        },
        STATE_KEY: {"dtype": "float32", "shape": [2], "names": {"motors": ["x", "y"]}},
        "action": {"dtype": "float32", "shape": [2], "names": {"motors": ["x", "y"]}},
        "next.reward": {"dtype": "float32", "shape": [1], "names": None},
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
        "frame_index": {"dtype": "int64", "shape": [1], "names": None},
        "episode_index": {"dtype": "int64", "shape": [1], "names": None},
        "index": {"dtype": "int64", "shape": [1], "names": None},
        "task_index": {"dtype": "int64", "shape": [1], "names": None},
    }


def _frame_table(episodes: list[dict], first_index: int = 0, first_episode: int = 0) -> pa.Table:
    cols: dict[str, list] = {k: [] for k in (STATE_KEY, "action", "next.reward", "timestamp")}
    cols.update({k: [] for k in ("frame_index", "episode_index", "index", "task_index")})
    index = first_index
    for e, ep in enumerate(episodes):
        n = len(ep["action"])
        cols[STATE_KEY] += ep["agent_pos"].tolist()
        cols["action"] += ep["action"].tolist()
        cols["next.reward"] += [0.0] * n
        cols["timestamp"] += [i / FPS for i in range(n)]
        cols["frame_index"] += list(range(n))
        cols["episode_index"] += [first_episode + e] * n
        cols["index"] += list(range(index, index + n))
        cols["task_index"] += [0] * n
        index += n
    vec = pa.list_(pa.float32(), 2)
    types = {STATE_KEY: vec, "action": vec, "next.reward": pa.float32(), "timestamp": pa.float32()}
    return pa.table({k: pa.array(v, type=types.get(k, pa.int64())) for k, v in cols.items()})


def _write_info(root: Path, episodes: list[dict], version: str, **layout: Any) -> list[int]:
    """``meta/info.json`` of a LeRobot ``version`` dataset of ``episodes``, with that version's ``layout``
    fields (file paths and sizes); returns the episode lengths."""
    h, w = episodes[0]["image"].shape[1:3]
    lengths = [len(ep["action"]) for ep in episodes]
    info = {
        "codebase_version": version,
        "robot_type": "pusht",
        "total_episodes": len(episodes),
        "total_frames": sum(lengths),
        "total_tasks": 1,
        "chunks_size": 1000,
        "fps": FPS,
        "splits": {"train": f"0:{len(episodes)}"},
        **layout,
        "features": _features(h, w),
    }
    (root / "meta").mkdir(parents=True, exist_ok=True)
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=4))
    return lengths


def write_lerobot_v3(root: Path, episodes: list[dict], video_frames: list[np.ndarray] | None = None) -> None:
    """``video_frames`` (per episode) replaces the episodes' images in the mp4, e.g. to cut a video short."""
    lengths = _write_info(
        root,
        episodes,
        "v3.0",
        data_files_size_in_mb=100,
        video_files_size_in_mb=500,
        data_path="data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        video_path="videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
    )
    pq.write_table(
        pa.table({"task_index": [0], "task": ["Push the T onto the target"]}), root / "meta" / "tasks.parquet"
    )
    (root / "data" / "chunk-000").mkdir(parents=True, exist_ok=True)
    pq.write_table(_frame_table(episodes), root / "data" / "chunk-000" / "file-000.parquet")
    frames = video_frames if video_frames is not None else [ep["image"] for ep in episodes]
    encode_video(root / "videos" / IMAGE_KEY / "chunk-000" / "file-000.mp4", np.concatenate(frames))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    meta = {
        "episode_index": list(range(len(episodes))),
        "tasks": [["Push the T onto the target"]] * len(episodes),
        "length": lengths,
        "data/chunk_index": [0] * len(episodes),
        "data/file_index": [0] * len(episodes),
        "dataset_from_index": starts.tolist(),
        "dataset_to_index": (starts + lengths).tolist(),
        f"videos/{IMAGE_KEY}/chunk_index": [0] * len(episodes),
        f"videos/{IMAGE_KEY}/file_index": [0] * len(episodes),
        f"videos/{IMAGE_KEY}/from_timestamp": (starts / FPS).tolist(),
        f"videos/{IMAGE_KEY}/to_timestamp": ((starts + lengths) / FPS).tolist(),
        "meta/episodes/chunk_index": [0] * len(episodes),
        "meta/episodes/file_index": [0] * len(episodes),
    }
    (root / "meta" / "episodes" / "chunk-000").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(meta), root / "meta" / "episodes" / "chunk-000" / "file-000.parquet")


def write_lerobot_v21(root: Path, episodes: list[dict]) -> None:
    lengths = _write_info(
        root,
        episodes,
        "v2.1",
        total_videos=len(episodes),
        total_chunks=1,
        data_path="data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        video_path="videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
    )
    lines = [
        json.dumps({"episode_index": i, "tasks": ["Push the T"], "length": n}) for i, n in enumerate(lengths)
    ]
    (root / "meta" / "episodes.jsonl").write_text("\n".join(lines) + "\n")
    (root / "meta" / "tasks.jsonl").write_text(json.dumps({"task_index": 0, "task": "Push the T"}) + "\n")
    index = 0
    for i, ep in enumerate(episodes):
        path = root / "data" / "chunk-000" / f"episode_{i:06d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(_frame_table([ep], first_index=index, first_episode=i), path)
        index += lengths[i]
        encode_video(root / "videos" / "chunk-000" / IMAGE_KEY / f"episode_{i:06d}.mp4", ep["image"])
