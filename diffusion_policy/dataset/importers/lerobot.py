"""LeRobotDataset directories, read with pyarrow and PyAV (the ``lerobot`` package is not needed).

Format versions read (``codebase_version`` in ``meta/info.json``):

- ``v3.0``: episodes listed in ``meta/episodes/chunk-*/file-*.parquet`` (``episode_index``, ``length``,
  ``data/chunk_index``, ``data/file_index``, ``videos/<key>/{chunk_index,file_index,from_timestamp}``);
  many episodes per data parquet and per mp4, located through ``info.json``'s ``data_path`` and
  ``video_path`` templates;
- ``v2.0`` / ``v2.1``: one parquet and one mp4 per episode (``episode_chunk`` = index // ``chunks_size``),
  episodes listed in ``meta/episodes.jsonl``.

Features: numeric columns (scalars, fixed-length lists, nested lists) and ``video`` features (decoded to
uint8 RGB at the table's timestamps, each frame within half a frame period of its row). ``image`` features
(PNG bytes inside the table) are decoded with Pillow. Keys: ``observation.`` is dropped and other dots
become underscores (``observation.images.top`` -> ``images_top``); ``action`` stays ``action``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from diffusion_policy.common.errors import first_line
from diffusion_policy.dataset.importers.writer import ACTION_KEY, Source, SourceError, zarr_key

VERSIONS = ("v2.0", "v2.1", "v3.0")
BOOKKEEPING = {"timestamp", "frame_index", "episode_index", "index", "task_index"}
VAL_SPLITS = ("val", "valid", "validation")


def _libs():
    try:
        import av
        import pyarrow.parquet as pq
    except ImportError:
        raise SourceError(
            "reading LeRobot datasets needs pyarrow and av: pip install -e '.[importers]'"
        ) from None
    return pq, av


def open_lerobot(
    root: str | Path, obs_keys: Sequence[str] | None = None, action_key: str = "action"
) -> Source:
    """Check the dataset's metadata, tables and videos, and return its episodes as a stream."""
    pq, _ = _libs()
    root = Path(root)
    info_path = root / "meta" / "info.json"
    if not info_path.is_file():
        raise SourceError(
            f"{root}: meta/info.json is missing; a LeRobotDataset directory has meta/, data/, videos/"
        )
    try:
        info = json.loads(info_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(f"{info_path}: not valid JSON ({e})") from None
    for key in ("codebase_version", "fps", "features", "data_path"):
        if key not in info:
            raise SourceError(f"{info_path}: '{key}' is missing")
    version = str(info["codebase_version"])
    if version not in VERSIONS:
        raise SourceError(
            f"{info_path}: codebase_version {version} is not read here; this reader reads {VERSIONS}"
        )
    features = info["features"]
    if obs_keys:
        names = list(obs_keys)
    else:
        names = [
            n for n, ft in features.items() if n.startswith("observation.") and ft.get("dtype") != "string"
        ]
    for name in [*names, action_key]:
        if name not in features:
            raise SourceError(f"{info_path}: feature '{name}' is missing (features: {sorted(features)})")
    keys: dict[str, str] = {}
    for name in names:
        keys[name] = zarr_key(name, keys.values())
    if ACTION_KEY in keys.values():
        raise SourceError(
            f"{info_path}: an observation feature maps to the key {ACTION_KEY!r} the action uses"
        )
    keys[action_key] = ACTION_KEY
    videos = [n for n in keys if features[n].get("dtype") == "video"]
    if videos and not info.get("video_path"):
        raise SourceError(f"{info_path}: features {videos} are videos but 'video_path' is missing")

    episodes = _episode_index(root, info, version, videos)
    fps = float(info["fps"])
    for ep in episodes:
        data_path = root / ep["data_path"]
        if not data_path.is_file():
            raise SourceError(f"{data_path} is missing (the table of episode {ep['episode_index']})")
        for key in videos:
            video = root / ep["videos"][key][0]
            if not video.is_file():
                raise SourceError(f"{video} is missing (video '{key}' of episode {ep['episode_index']})")
    columns = [n for n in keys if features[n].get("dtype") != "video"]
    for path in sorted({ep["data_path"] for ep in episodes}):
        try:
            schema = pq.read_schema(root / path)
        except Exception as e:  # pyarrow raises several types for a broken file
            raise SourceError(f"{root / path}: not a readable parquet file ({first_line(e)})") from None
        for name in [*columns, "episode_index"]:
            if name not in schema.names:
                raise SourceError(f"{root / path}: column '{name}' is missing")
    val_mask = _val_mask(info, [ep["episode_index"] for ep in episodes])
    return Source(
        description=root.name,
        n_episodes=len(episodes),
        episodes=_stream(root, episodes, keys, columns, videos, features, fps),
        val_mask=val_mask,
        key_names=keys,
    )


def _episode_index(root: Path, info: dict, version: str, videos: list[str]) -> list[dict]:
    """Per episode: index, length, data file, and per video key (file, start time in that file)."""
    pq, _ = _libs()
    out = []
    if version == "v3.0":
        meta_dir = root / "meta" / "episodes"
        files = sorted(meta_dir.glob("chunk-*/file-*.parquet"))
        if not files:
            raise SourceError(f"{meta_dir}: no chunk-*/file-*.parquet episode tables")
        wanted = ["episode_index", "length", "data/chunk_index", "data/file_index"]
        for key in videos:
            wanted += [
                f"videos/{key}/chunk_index",
                f"videos/{key}/file_index",
                f"videos/{key}/from_timestamp",
            ]
        rows = []
        for f in files:
            try:
                names = pq.read_schema(f).names
                missing = [c for c in wanted if c not in names]
                if missing:
                    raise SourceError(f"{f}: column '{missing[0]}' is missing")
                rows += pq.read_table(f, columns=wanted).to_pylist()
            except SourceError:
                raise
            except Exception as e:
                raise SourceError(f"{f}: not a readable parquet file ({first_line(e)})") from None
        for row in sorted(rows, key=lambda r: r["episode_index"]):
            ep = {
                "episode_index": int(row["episode_index"]),
                "length": int(row["length"]),
                "data_path": _format(
                    info, "data_path", chunk_index=row["data/chunk_index"], file_index=row["data/file_index"]
                ),
                "videos": {},
            }
            for key in videos:
                path = _format(
                    info,
                    "video_path",
                    video_key=key,
                    chunk_index=row[f"videos/{key}/chunk_index"],
                    file_index=row[f"videos/{key}/file_index"],
                )
                ep["videos"][key] = (path, float(row[f"videos/{key}/from_timestamp"]))
            out.append(ep)
    else:
        jsonl = root / "meta" / "episodes.jsonl"
        if not jsonl.is_file():
            raise SourceError(f"{jsonl} is missing (the episode list of a {version} dataset)")
        chunks_size = int(info.get("chunks_size", 1000))
        rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
        for row in sorted(rows, key=lambda r: r["episode_index"]):
            index = int(row["episode_index"])
            chunk = index // chunks_size
            ep = {
                "episode_index": index,
                "length": int(row["length"]),
                "data_path": _format(info, "data_path", episode_chunk=chunk, episode_index=index),
                "videos": {
                    key: (
                        _format(info, "video_path", episode_chunk=chunk, video_key=key, episode_index=index),
                        0.0,
                    )
                    for key in videos
                },
            }
            out.append(ep)
    if not out:
        raise SourceError(f"{root}: the dataset lists no episodes")
    return out


def _format(info: dict, template: str, **values) -> str:
    try:
        return info[template].format(**values)
    except (KeyError, IndexError, ValueError) as e:
        raise SourceError(f"meta/info.json: {template} {info[template]!r} cannot be filled ({e})") from None


def _val_mask(info: dict, episode_indices: list[int]) -> np.ndarray | None:
    """info.json ``splits`` such as ``{"train": "0:40", "val": "40:50"}``: episodes of a validation split."""
    splits = info.get("splits") or {}
    for name in VAL_SPLITS:
        if name in splits:
            start, _, stop = str(splits[name]).partition(":")
            try:
                lo, hi = int(start), int(stop)
            except ValueError:
                raise SourceError(
                    f"meta/info.json: splits.{name}={splits[name]!r} is not 'start:stop'"
                ) from None
            return np.array([lo <= i < hi for i in episode_indices], dtype=bool)
    return None


def _stream(root, episodes, keys, columns, videos, features, fps) -> Iterator[dict[str, np.ndarray]]:
    pq, _ = _libs()
    table_path, table = None, None
    decoders: dict[str, VideoDecoder] = {}
    tol = 0.5 / fps
    try:
        for ep in episodes:
            index, length = ep["episode_index"], ep["length"]
            if ep["data_path"] != table_path:  # one data file in memory at a time
                table_path = ep["data_path"]
                wanted = [*columns, "episode_index"]
                names = pq.read_schema(root / table_path).names
                wanted += [c for c in ("frame_index", "timestamp") if c in names]
                try:
                    table = pq.read_table(root / table_path, columns=wanted)
                except Exception as e:
                    raise SourceError(f"{root / table_path}: cannot read ({first_line(e)})") from None
            rows = np.nonzero(table.column("episode_index").to_numpy() == index)[0]
            if len(rows) != length:
                raise SourceError(
                    f"{root / table_path}: episode {index} has {len(rows)} rows, "
                    f"its metadata says length {length}"
                )
            part = table.take(rows)
            if "frame_index" in part.column_names:
                part = part.take(np.argsort(part.column("frame_index").to_numpy(), kind="stable"))
            times = (
                part.column("timestamp").to_numpy().astype(np.float64)
                if "timestamp" in part.column_names
                else np.arange(length) / fps
            )
            episode = {}
            for name in columns:
                episode[keys[name]] = _column_array(
                    part.column(name), name, features[name], root / table_path
                )
            for name in videos:
                path, start = ep["videos"][name]
                if path not in decoders:
                    for old in decoders.values():
                        old.close()
                    decoders = {}
                decoder = decoders.setdefault(path, VideoDecoder(root / path))
                frames = decoder.frames_at(start + times, tol, f"episode {index}")
                _check_frame_shape(frames, features[name], name, root / path)
                episode[keys[name]] = frames
            yield episode
    finally:
        for decoder in decoders.values():
            decoder.close()


def _column_array(column, name: str, feature: dict, where: Path) -> np.ndarray:
    """A table column as (rows, *shape): scalars, (nested) lists, or PNG/JPEG image structs."""
    import pyarrow as pa

    arr = column.combine_chunks()
    n = len(arr)
    if feature.get("dtype") == "image":
        return np.stack([_decode_image(v, where) for v in arr.to_pylist()]) if n else np.zeros((0,))
    values = arr
    while (
        pa.types.is_list(values.type)
        or pa.types.is_fixed_size_list(values.type)
        or pa.types.is_large_list(values.type)
    ):
        values = values.flatten()
    flat = values.to_numpy(zero_copy_only=False)
    shape = tuple(int(s) for s in feature.get("shape", ()))
    if flat.size != n * int(np.prod(shape or (1,))):
        raise SourceError(
            f"{where}: column '{name}' holds {flat.size // max(n, 1)} "
            f"values per row, meta/info.json says shape {list(shape)}"
        )
    return flat.reshape(n, *shape) if shape else flat.reshape(n, 1)


def _decode_image(value, where: Path) -> np.ndarray:
    from PIL import Image

    data = value.get("bytes") if isinstance(value, dict) else None
    if not data:
        raise SourceError(
            f"{where}: an image cell holds no bytes (images stored as separate files are not read)"
        )
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _check_frame_shape(frames: np.ndarray, feature: dict, name: str, path: Path) -> None:
    shape = [int(s) for s in feature.get("shape", ())]
    names = feature.get("names") or []
    if len(shape) == 3 and names and names[0] in ("channel", "channels"):
        shape = [shape[1], shape[2], shape[0]]
    if shape and list(frames.shape[1:]) != shape:
        raise SourceError(
            f"{path}: frames are {list(frames.shape[1:])} (H, W, C), meta/info.json says {name} is {shape}"
        )


class VideoDecoder:
    """Frames of one mp4 in time order; a request for an earlier time reopens the file."""

    def __init__(self, path: Path):
        self.path = path
        self.container = None
        self.frames = None
        self.pending = None  # (time, frame) decoded but not used yet
        self.last = None  # time of the last frame used or skipped

    def _open(self):
        _, av = _libs()
        self.close()
        try:
            self.container = av.open(str(self.path))
        except av.FFmpegError as e:
            raise SourceError(f"{self.path}: cannot open the video ({first_line(e)})") from None
        if not self.container.streams.video:
            raise SourceError(f"{self.path}: has no video stream")
        stream = self.container.streams.video[0]
        stream.thread_type = "AUTO"
        self.frames = self.container.decode(stream)
        self.time_base = stream.time_base
        self.pending = None
        self.last = None

    def _next(self):
        _, av = _libs()
        try:
            frame = next(self.frames)
        except StopIteration:
            return None
        except av.FFmpegError as e:
            raise SourceError(f"{self.path}: cannot decode ({first_line(e)})") from None
        if frame.pts is None:
            raise SourceError(f"{self.path}: a frame has no timestamp")
        return float(frame.pts * self.time_base), frame

    def frames_at(self, times: np.ndarray, tol: float, what: str) -> np.ndarray:
        """uint8 (len(times), H, W, 3): for each time the frame within ``tol`` seconds of it."""
        if self.container is None or (self.last is not None and self.last >= times[0] - tol):
            self._open()
        out = []
        for t in times:
            while True:
                if self.pending is None:
                    self.pending = self._next()
                    if self.pending is None:
                        raise SourceError(
                            f"{self.path}: the video ends before {what}'s frame at {t:.3f} s "
                            f"({len(out)} of {len(times)} frames found): the video is shorter than its table"
                        )
                if self.pending[0] < t - tol:
                    self.last, self.pending = self.pending[0], None
                    continue
                break
            frame_time, frame = self.pending
            if abs(frame_time - t) > tol:
                raise SourceError(
                    f"{self.path}: no frame within {tol:.4f} s of {t:.3f} s ({what}); "
                    f"the next is at {frame_time:.3f} s"
                )
            out.append(frame.to_ndarray(format="rgb24"))
            self.last, self.pending = frame_time, None
        return np.stack(out)

    def close(self):
        if self.container is not None:
            self.container.close()
        self.container = None
        self.frames = None
        self.pending = None
        self.last = None
