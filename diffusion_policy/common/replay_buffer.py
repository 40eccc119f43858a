"""Episode storage in the original Diffusion Policy zarr layout, on zarr 3.

Layout (one root group)::

    data/<key>         (N, ...) arrays, time-major, all episodes concatenated
    meta/episode_ends  (E,) int64, exclusive end index of each episode (so N == episode_ends[-1])

Two backends: ``zarr`` (arrays stay in a zarr group, on disk or in a MemoryStore, read on access)
and ``numpy`` (everything loaded into RAM). New stores are written in zarr format 2 by default so
that zarr 2 tooling, including the original codebase, reads them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numcodecs
import numpy as np
import zarr
import zarr.codecs

EXPECTED_LAYOUT = (
    "expected a root group with data/<key> arrays concatenated over episodes along axis 0 "
    "and meta/episode_ends (int64 exclusive episode ends, episode_ends[-1] == len(data/<key>))"
)
MISSING_DATA_HINT = (
    "for PushT, download pusht.zip from the Diffusion Policy data page and unzip it into data/, "
    "or point task.dataset.zarr_path at an existing copy"
)
# Bytes moved per read/write when copying large arrays, so a copy never holds a whole array.
COPY_BLOCK_BYTES = 64 * 2**20

ChunkSpec = dict[str, tuple[int, ...]] | tuple[int, ...] | None
CompressorSpec = Any  # 'default' | 'disk' | None | codec | dict[str, one of those]


def resolve_compressor(spec: Any = "default", zarr_format: int = 2) -> Any:
    """Compressor by name: ``'default'`` is Blosc lz4 level 5 (fast), ``'disk'`` Blosc zstd level 5
    with bit-shuffle (small, what the PushT data uses). ``None`` means uncompressed; codec objects
    pass through."""
    if isinstance(spec, str):
        params = {"default": ("lz4", "noshuffle"), "disk": ("zstd", "bitshuffle")}
        if spec not in params:
            raise ValueError(f"compressor {spec!r} is unknown; use 'default', 'disk', None or a codec")
        cname, shuffle = params[spec]
        if zarr_format == 2:
            shuffle_id = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "bitshuffle": numcodecs.Blosc.BITSHUFFLE}
            return numcodecs.Blosc(cname=cname, clevel=5, shuffle=shuffle_id[shuffle])
        return zarr.codecs.BloscCodec(cname=cname, clevel=5, shuffle=shuffle)
    return spec


def get_optimal_chunks(shape: Sequence[int], dtype: Any, target_chunk_bytes: float = 2e6) -> tuple[int, ...]:
    """Chunk along time only, with about ``target_chunk_bytes`` per chunk (at least one step)."""
    shape = tuple(int(s) for s in shape)
    step_bytes = np.dtype(dtype).itemsize * math.prod(shape[1:])
    n_time = max(1, int(target_chunk_bytes // max(step_bytes, 1)))
    n_time = min(n_time, max(shape[0], 1)) if shape else 1
    return (n_time, *shape[1:])


def _describe(group: zarr.Group) -> str:
    return str(group.store_path)


def _check_layout(
    episode_ends: Any, data: dict[str, Any] | zarr.Group, where: str, has_meta: bool = True
) -> None:
    if not has_meta:
        raise ValueError(f"{where}: missing 'meta/episode_ends'; {EXPECTED_LAYOUT}")
    if len(episode_ends.shape) != 1:
        raise ValueError(
            f"{where}: meta/episode_ends has shape {tuple(episode_ends.shape)}, not 1-D; {EXPECTED_LAYOUT}"
        )
    ends = np.asarray(episode_ends[:])
    if ends.size and (np.any(np.diff(ends) < 0) or ends[0] < 0):
        raise ValueError(f"{where}: meta/episode_ends is not non-decreasing from >= 0; {EXPECTED_LAYOUT}")
    n_steps = int(ends[-1]) if ends.size else 0
    for key, arr in data.items():
        if len(arr.shape) == 0 or arr.shape[0] != n_steps:
            length = arr.shape[0] if len(arr.shape) else "no"
            raise ValueError(
                f"{where}: data/{key} has {length} steps but meta/episode_ends[-1] is {n_steps}; "
                f"{EXPECTED_LAYOUT}"
            )


def _open_group(path: str | os.PathLike, mode: str) -> zarr.Group:
    path = os.path.expanduser(str(path))
    exists = os.path.exists(path)
    if mode in ("r", "r+") and not exists:
        raise FileNotFoundError(f"zarr dataset not found at '{path}'; {MISSING_DATA_HINT}")
    if mode == "w" or not exists:
        return _new_group(path, mode)  # new stores are format 2
    try:
        return zarr.open_group(path, mode=mode)
    except zarr.errors.GroupNotFoundError as e:
        raise ValueError(f"{path}: not a zarr group; {EXPECTED_LAYOUT}") from e


def _whole_chunks(value: np.ndarray) -> tuple[int, ...]:
    # Meta arrays are tiny: one chunk each (a zero-length axis still needs a chunk length >= 1).
    return tuple(max(int(s), 1) for s in value.shape)


def _new_group(store: Any, mode: str = "w", zarr_format: int = 2) -> zarr.Group:
    return zarr.open_group(store, mode=mode, zarr_format=zarr_format)


def _iter_blocks(n: int, step_bytes: int, chunk_len: int) -> Iterator[slice]:
    """Time slices of about COPY_BLOCK_BYTES that are whole multiples of the target chunk length."""
    per_block = max(1, COPY_BLOCK_BYTES // max(step_bytes, 1) // chunk_len) * chunk_len
    for start in range(0, n, per_block):
        yield slice(start, min(start + per_block, n))


class ReplayBuffer:
    """Episodes of time-major arrays; see the module docstring for the layout.

    Build with one of the ``create_*`` / ``copy_from_*`` class methods. ``backend`` is ``'zarr'``
    when the root is a ``zarr.Group``, else ``'numpy'`` (a dict of numpy arrays).
    """

    def __init__(self, root: zarr.Group | dict[str, dict[str, Any]]) -> None:
        if isinstance(root, zarr.Group):
            where = _describe(root)
            if "data" not in root or not isinstance(root["data"], zarr.Group):
                raise ValueError(f"{where}: missing group 'data'; {EXPECTED_LAYOUT}")
            has_meta = "meta" in root and "episode_ends" in root["meta"]
            meta_ends = root["meta"]["episode_ends"] if has_meta else None
            _check_layout(meta_ends, dict(root["data"].arrays()), where, has_meta)
        elif isinstance(root, dict):
            if not isinstance(root.get("data"), dict):
                raise ValueError(f"<numpy>: missing dict 'data'; {EXPECTED_LAYOUT}")
            has_meta = "episode_ends" in root.get("meta", {})
            ends = root["meta"]["episode_ends"] if has_meta else None
            _check_layout(ends, root["data"], "<numpy>", has_meta)
        else:
            raise TypeError(f"ReplayBuffer root must be a zarr.Group or a dict, got {type(root).__name__}")
        self.root = root

    # ----------------------------------------------------------------- construction

    @classmethod
    def create_empty_numpy(cls) -> ReplayBuffer:
        return cls({"data": {}, "meta": {"episode_ends": np.zeros((0,), dtype=np.int64)}})

    @classmethod
    def create_empty_zarr(cls, storage: Any = None, root: zarr.Group | None = None) -> ReplayBuffer:
        """Empty zarr-backed buffer in ``storage`` (a store or path; default in-memory), format 2."""
        if root is None:
            root = _new_group(zarr.storage.MemoryStore() if storage is None else storage)
        cls._init_empty_group(root)
        return cls(root)

    @staticmethod
    def _init_empty_group(root: zarr.Group) -> None:
        root.require_group("data")
        meta = root.require_group("meta")
        if "episode_ends" not in meta:
            meta.create_array("episode_ends", shape=(0,), dtype=np.int64, chunks=(1024,), compressors=None)

    @classmethod
    def create_from_group(cls, group: zarr.Group) -> ReplayBuffer:
        """Wrap an existing group; a writable group without the layout is initialised empty."""
        if "data" not in group and "meta" not in group and not group.read_only:
            cls._init_empty_group(group)
        return cls(group)

    @classmethod
    def create_from_path(cls, zarr_path: str | os.PathLike, mode: str = "r") -> ReplayBuffer:
        """Open an on-disk store without loading it (zarr backend; each access reads from disk)."""
        return cls.create_from_group(_open_group(zarr_path, mode))

    @classmethod
    def copy_from_store(
        cls,
        src_store: Any,
        store: Any = None,
        keys: Sequence[str] | None = None,
        chunks: ChunkSpec = None,
        compressors: CompressorSpec = None,
        if_exists: str = "replace",
        zarr_format: int = 2,
    ) -> ReplayBuffer:
        """Copy ``keys`` (default all) of a store. ``store=None`` loads into RAM (numpy backend);
        otherwise the data are written into ``store`` (see ``save_to_store`` for chunks/compressors)."""
        src = cls(src_store if isinstance(src_store, zarr.Group) else zarr.open_group(src_store, mode="r"))
        return src._copy(store, keys, chunks, compressors, if_exists, zarr_format)

    @classmethod
    def copy_from_path(
        cls, zarr_path: str | os.PathLike, backend: str | None = None, **copy: Any
    ) -> ReplayBuffer:
        """``copy_from_store`` of the store at a path, with its options (``store``, ``keys``, ``chunks``,
        ``compressors``, ``if_exists``, ``zarr_format``) and defaults; ``backend='numpy'`` forces RAM,
        ``'zarr'`` with ``store=None`` copies into an in-memory zarr store."""
        if backend not in (None, "numpy", "zarr"):
            raise ValueError(f"backend={backend!r} is unknown; use 'numpy' or 'zarr'")
        if backend == "numpy":
            copy["store"] = None
        elif backend == "zarr" and copy.get("store") is None:
            copy["store"] = zarr.storage.MemoryStore()
        return cls.copy_from_store(_open_group(zarr_path, "r"), **copy)

    def _copy(self, store, keys, chunks, compressors, if_exists, zarr_format) -> ReplayBuffer:
        keys = list(self.keys()) if keys is None else list(keys)
        missing = [k for k in keys if k not in self.data]
        if missing:
            raise KeyError(f"keys {missing} not in the replay buffer; it has {sorted(self.keys())}")
        if store is None:
            meta = {k: np.asarray(v[...]) for k, v in self._meta_arrays()}
            data = {k: np.asarray(self.data[k][:]) for k in keys}
            return ReplayBuffer({"data": data, "meta": meta})
        return self._write(store, keys, chunks, compressors, if_exists, zarr_format)

    # ----------------------------------------------------------------- saving

    def save_to_store(
        self,
        store: Any,
        chunks: ChunkSpec = None,
        compressors: CompressorSpec = "disk",
        if_exists: str = "replace",
        zarr_format: int = 2,
    ) -> ReplayBuffer:
        """Write every key into ``store`` (a zarr store, path or group) and return a zarr-backed
        buffer on it. ``chunks``: per-key dict or one tuple, default ~2 MB time chunks.
        ``compressors``: ``'disk'`` (default), ``'default'``, ``None`` or a codec, or a per-key dict.
        ``if_exists``: ``'replace'`` overwrites existing arrays, ``'raise'`` refuses."""
        return self._write(store, list(self.keys()), chunks, compressors, if_exists, zarr_format)

    def save_to_path(
        self,
        zarr_path: str | os.PathLike,
        chunks: ChunkSpec = None,
        compressors: CompressorSpec = "disk",
        if_exists: str = "replace",
        zarr_format: int = 2,
    ) -> ReplayBuffer:
        return self.save_to_store(
            os.path.expanduser(str(zarr_path)), chunks, compressors, if_exists, zarr_format
        )

    def _write(self, store, keys, chunks, compressors, if_exists, zarr_format) -> ReplayBuffer:
        if if_exists not in ("replace", "raise"):
            raise ValueError(f"if_exists={if_exists!r} is unknown; use 'replace' or 'raise'")
        if zarr_format not in (2, 3):
            raise ValueError(f"zarr_format={zarr_format} is unsupported; use 2 or 3")
        root = store if isinstance(store, zarr.Group) else _new_group(store, "a", zarr_format)
        zarr_format = root.metadata.zarr_format
        data_group = root.require_group("data")
        meta_group = root.require_group("meta")
        for name, value in self._meta_arrays():
            value = np.asarray(value[...])
            self._check_exists(meta_group, name, if_exists)
            meta_group.create_array(
                name, data=value, chunks=_whole_chunks(value), overwrite=True, compressors=None
            )
        for key in keys:
            src = self.data[key]
            self._check_exists(data_group, key, if_exists)
            key_chunks = chunks.get(key) if isinstance(chunks, dict) else chunks
            if key_chunks is None:
                key_chunks = get_optimal_chunks(src.shape, src.dtype)
            key_cpr = compressors.get(key, "disk") if isinstance(compressors, dict) else compressors
            dst = data_group.create_array(
                key,
                shape=src.shape,
                dtype=src.dtype,
                chunks=tuple(key_chunks),
                compressors=resolve_compressor(key_cpr, zarr_format),
                overwrite=True,
            )
            step_bytes = src.dtype.itemsize * math.prod(src.shape[1:])
            for block in _iter_blocks(src.shape[0], step_bytes, dst.chunks[0]):
                dst[block] = src[block]
        return ReplayBuffer(root)

    @staticmethod
    def _check_exists(group: zarr.Group, name: str, if_exists: str) -> None:
        if if_exists == "raise" and name in group:
            raise FileExistsError(f"{_describe(group)}/{name} already exists and if_exists='raise'")

    # ----------------------------------------------------------------- access

    @property
    def data(self) -> dict[str, Any] | zarr.Group:
        return self.root["data"]

    @property
    def meta(self) -> dict[str, Any] | zarr.Group:
        return self.root["meta"]

    @property
    def backend(self) -> str:
        return "zarr" if isinstance(self.root, zarr.Group) else "numpy"

    def _meta_arrays(self) -> list[tuple[str, Any]]:
        if self.backend == "zarr":
            return list(self.meta.arrays())
        return list(self.meta.items())

    @property
    def episode_ends(self) -> np.ndarray:
        """(E,) int64 exclusive ends (a copy read from the store for the zarr backend)."""
        ends = self.meta["episode_ends"]
        return ends if isinstance(ends, np.ndarray) else np.asarray(ends[:])

    @property
    def n_episodes(self) -> int:
        return int(self.meta["episode_ends"].shape[0])

    @property
    def n_steps(self) -> int:
        ends = self.episode_ends
        return int(ends[-1]) if len(ends) else 0

    @property
    def episode_lengths(self) -> np.ndarray:
        return np.diff(self.episode_ends, prepend=0)

    @property
    def chunk_size(self) -> int | None:
        if self.backend == "numpy":
            return None
        return int(self.meta["episode_ends"].chunks[0])

    def get_chunks(self) -> dict[str, tuple[int, ...]]:
        if self.backend == "numpy":
            raise RuntimeError("a numpy-backed ReplayBuffer has no chunks")
        return {k: tuple(v.chunks) for k, v in self.data.arrays()}

    def get_compressors(self) -> dict[str, Any]:
        if self.backend == "numpy":
            raise RuntimeError("a numpy-backed ReplayBuffer has no compressors")
        return {k: (v.compressors[0] if v.compressors else None) for k, v in self.data.arrays()}

    def keys(self) -> list[str]:
        return list(self.data.array_keys()) if self.backend == "zarr" else list(self.data.keys())

    def values(self) -> list[Any]:
        return [self.data[k] for k in self.keys()]

    def items(self) -> list[tuple[str, Any]]:
        return [(k, self.data[k]) for k in self.keys()]

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {tuple(v.shape)} {v.dtype}" for k, v in self.items())
        return f"ReplayBuffer(backend={self.backend}, n_episodes={self.n_episodes}, {{{shapes}}})"

    def _episode_bounds(self, idx: int) -> tuple[int, int]:
        n = self.n_episodes
        if not -n <= idx < n:
            raise IndexError(f"episode index {idx} out of range for {n} episodes")
        idx = idx % n
        ends = self.episode_ends
        start = int(ends[idx - 1]) if idx > 0 else 0
        return start, int(ends[idx])

    def get_episode_slice(self, idx: int) -> slice:
        return slice(*self._episode_bounds(idx))

    def get_episode(self, idx: int, copy: bool = False) -> dict[str, np.ndarray]:
        """Episode ``idx`` (negative counts from the end) as key -> (L, ...) arrays.
        numpy backend: views into the buffer unless ``copy``."""
        return self.get_steps_slice(*self._episode_bounds(idx), copy=copy)

    def get_steps_slice(
        self, start: int, stop: int, step: int | None = None, copy: bool = False
    ) -> dict[str, np.ndarray]:
        sl = slice(start, stop, step)
        out = {}
        for key, arr in self.items():
            x = arr[sl]
            out[key] = x.copy() if copy and isinstance(arr, np.ndarray) else x
        return out

    def get_episode_idxs(self) -> np.ndarray:
        """(N,) episode index of every step."""
        return np.repeat(np.arange(self.n_episodes), self.episode_lengths)

    # ----------------------------------------------------------------- mutation

    def update_meta(self, data: dict[str, Any]) -> None:
        """Add or replace meta arrays (``episode_ends`` cannot be replaced this way)."""
        if "episode_ends" in data:
            raise ValueError("update_meta cannot set 'episode_ends'; use add_episode/drop_episode")
        for key, value in data.items():
            value = np.asarray(value)
            if self.backend == "numpy":
                self.meta[key] = value
            else:
                self.meta.create_array(
                    key, data=value, chunks=_whole_chunks(value), overwrite=True, compressors=None
                )

    def add_episode(
        self, data: dict[str, Any], chunks: ChunkSpec = None, compressors: CompressorSpec = "disk"
    ) -> None:
        """Append one episode: key -> (L, ...) arrays, all the same length L.

        An empty buffer takes any keys; afterwards every episode must have exactly the buffer's
        keys and per-step shapes. ``chunks``/``compressors`` apply to keys created here (zarr)."""
        if not data:
            raise ValueError("add_episode got no arrays")
        data = {k: np.asarray(v) for k, v in data.items()}
        lengths = {k: (v.shape[0] if v.ndim else None) for k, v in data.items()}
        if len(set(lengths.values())) != 1 or None in lengths.values():
            raise ValueError(f"add_episode arrays must share one length along axis 0, got {lengths}")
        ep_len = next(iter(lengths.values()))
        existing = set(self.keys())
        if self.n_steps > 0 and set(data) != existing:
            raise ValueError(f"episode keys {sorted(data)} differ from the buffer's keys {sorted(existing)}")
        for key, value in data.items():
            if key in existing and tuple(self.data[key].shape[1:]) != value.shape[1:]:
                raise ValueError(
                    f"episode {key!r} has per-step shape {value.shape[1:]}, "
                    f"the buffer holds {tuple(self.data[key].shape[1:])}"
                )
        curr = self.n_steps
        new_len = curr + ep_len
        for key, value in data.items():
            if self.backend == "numpy":
                old = self.data.get(key)
                self.data[key] = (
                    value.copy() if old is None else np.concatenate([old, value.astype(old.dtype)])
                )
                continue
            if key not in self.data:
                key_chunks = chunks.get(key) if isinstance(chunks, dict) else chunks
                key_cpr = compressors.get(key, "disk") if isinstance(compressors, dict) else compressors
                self.data.create_array(
                    key,
                    shape=(0, *value.shape[1:]),
                    dtype=value.dtype,
                    chunks=tuple(key_chunks or get_optimal_chunks(value.shape, value.dtype)),
                    compressors=resolve_compressor(key_cpr, self.root.metadata.zarr_format),
                )
            arr = self.data[key]
            arr.resize((new_len, *arr.shape[1:]))
            arr[curr:new_len] = value
        self._set_episode_ends(np.append(self.episode_ends, np.int64(new_len)))

    def _set_episode_ends(self, ends: np.ndarray) -> None:
        ends = ends.astype(np.int64)
        if self.backend == "numpy":
            self.meta["episode_ends"] = ends
            return
        arr = self.meta["episode_ends"]
        arr.resize(ends.shape)
        if ends.size:
            arr[:] = ends

    def drop_episode(self) -> None:
        """Remove the last episode."""
        if self.n_episodes == 0:
            raise IndexError("drop_episode on an empty ReplayBuffer")
        ends = self.episode_ends[:-1].copy()
        start = int(ends[-1]) if len(ends) else 0
        for key in self.keys():
            arr = self.data[key]
            if self.backend == "numpy":
                self.data[key] = arr[:start].copy()
            else:
                arr.resize((start, *arr.shape[1:]))
        self._set_episode_ends(ends)

    def pop_episode(self) -> dict[str, np.ndarray]:
        """Remove the last episode and return it (copied)."""
        episode = self.get_episode(-1, copy=True)
        self.drop_episode()
        return episode

    def extend(self, data: dict[str, Any]) -> None:
        self.add_episode(data)
