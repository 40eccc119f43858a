"""Write a stream of episodes into a ReplayBuffer zarr atomically, and describe a zarr as ``shape_meta``."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from diffusion_policy.common.replay_buffer import ReplayBuffer, get_optimal_chunks

ACTION_KEY = "action"
VAL_MASK_KEY = "val_mask"
# chunk length along time is chosen for ~2 MB chunks as if the array were this long, so the first
# episode's length does not cap it
NOMINAL_STEPS = 10**9


class SourceError(ValueError):
    """The source is malformed or incomplete; the message is one line naming what is missing."""


@dataclass
class Source:
    """What a reader found: episodes to stream, their count and the file's own validation split."""

    description: str
    n_episodes: int
    episodes: Iterator[dict[str, np.ndarray]]
    val_mask: np.ndarray | None = None
    key_names: dict[str, str] = field(default_factory=dict)  # source name -> zarr key


def temporary_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_episodes(source: Source, out_path: str | os.PathLike, overwrite: bool = False) -> ReplayBuffer:
    """Append every episode of ``source`` to a new zarr at ``out_path`` (format 2, the original's layout).

    The zarr is built under a temporary name next to ``out_path`` and renamed into place at the end, so an
    error or Ctrl-C leaves no output; an existing ``out_path`` is replaced only with ``overwrite``.
    """
    out = Path(out_path)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    tmp = temporary_sibling(out)
    if tmp.exists():
        shutil.rmtree(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        buffer = ReplayBuffer.create_empty_zarr(storage=str(tmp))
        chunks: dict[str, tuple[int, ...]] | None = None
        bar = tqdm(source.episodes, total=source.n_episodes, desc=f"import {source.description}", unit="ep")
        for i, episode in enumerate(bar):
            if chunks is None:
                chunks = {
                    k: get_optimal_chunks((NOMINAL_STEPS, *v.shape[1:]), v.dtype) for k, v in episode.items()
                }
            try:
                buffer.add_episode(episode, chunks=chunks, compressors="disk")
            except ValueError as e:
                raise SourceError(f"{source.description}: episode {i}: {e}") from None
        bar.close()
        if buffer.n_episodes != source.n_episodes:
            raise SourceError(
                f"{source.description}: {buffer.n_episodes} episodes were read, "
                f"the index lists {source.n_episodes}"
            )
        if source.val_mask is not None:
            buffer.update_meta({VAL_MASK_KEY: np.asarray(source.val_mask, dtype=bool)})
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ReplayBuffer.create_from_path(out, mode="r")


def shape_meta_of(buffer: ReplayBuffer) -> dict:
    """``shape_meta`` for a zarr: (N, H, W, C) uint8 arrays with 1, 3 or 4 channels are rgb, everything
    else low-dim; ``action`` is the action. rgb keys first, then low-dim keys, each sorted by name (zarr
    lists keys in no fixed order, and the obs encoder follows this order)."""
    if ACTION_KEY not in buffer:
        raise SourceError(f"the zarr has no data/{ACTION_KEY}; it has {sorted(buffer.keys())}")
    rgb, low_dim = {}, {}
    for key in sorted(buffer.keys()):
        if key == ACTION_KEY:
            continue
        arr = buffer[key]
        shape = [int(s) for s in arr.shape[1:]]
        if is_image(arr.shape, arr.dtype):
            rgb[key] = {"shape": [shape[2], shape[0], shape[1]], "type": "rgb"}
        else:
            low_dim[key] = {"shape": shape, "type": "low_dim"}
    return {"obs": {**rgb, **low_dim}, "action": {"shape": [int(s) for s in buffer[ACTION_KEY].shape[1:]]}}


def is_image(shape: tuple[int, ...], dtype) -> bool:
    return len(shape) == 4 and shape[-1] in (1, 3, 4) and np.dtype(dtype) == np.uint8


def shape_meta_yaml(shape_meta: dict) -> str:
    """The ``shape_meta:`` block as it goes into a task config."""
    lines = ["shape_meta:", "  obs:"]
    for key, meta in shape_meta["obs"].items():
        lines += [f"    {key}:", f"      shape: {meta['shape']}", f"      type: {meta['type']}"]
    lines += ["  action:", f"    shape: {shape_meta['action']['shape']}"]
    return "\n".join(lines) + "\n"


def zarr_key(name: str, taken: Iterable[str] = ()) -> str:
    """A zarr / shape_meta key for a source feature name: LeRobot's ``observation.`` prefix dropped and
    other dots made underscores (obs encoders keep one torch submodule per key, which cannot hold dots)."""
    key = name.removeprefix("observation.").replace(".", "_").replace("/", "_")
    if key in set(taken):
        raise SourceError(f"feature {name!r} maps to the key {key!r}, which another feature already uses")
    return key
