"""Append episodes to an on-disk ReplayBuffer zarr so that an interrupted append never corrupts it.

``ReplayBuffer.add_episode`` writes the data arrays first and ``meta/episode_ends`` last, and zarr (>= 3.1)
replaces every file it writes atomically (temporary file + rename). So whatever stops an append (Ctrl-C,
``kill -9``, a crash, power loss), each file on disk is either its old or its new version, and the
episodes listed in ``episode_ends`` are intact. What can be left over is a partial tail: data arrays
longer than ``episode_ends[-1]``, or ``episode_ends`` grown by one entry whose value was not written yet
(it reads 0, since episodes have at least one step). :func:`open_for_append` drops such a tail.
Ctrl-C / SIGTERM during :func:`append_episode` wait for the append to finish.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import zarr

from diffusion_policy.common import shutdown
from diffusion_policy.common.errors import RunInterrupted
from diffusion_policy.common.replay_buffer import ReplayBuffer

ENDS_CHUNK = 1024


def committed_episodes(ends: np.ndarray, n_data: int) -> int:
    """How many leading entries of ``ends`` describe whole episodes present in arrays of ``n_data`` steps."""
    k, previous = 0, 0
    for end in ends:
        if end <= previous or end > n_data:
            break
        k, previous = k + 1, int(end)
    return k


def open_for_append(path: str | os.PathLike) -> tuple[ReplayBuffer, int]:
    """(buffer, dropped steps): the zarr at ``path`` opened for appending (created empty, format 2, when
    missing), after dropping the partial tail an interrupted append left."""
    path = Path(path)
    if not path.exists():
        return ReplayBuffer.create_empty_zarr(storage=str(path)), 0
    if not path.is_dir():
        raise ValueError(f"{path} is a file, not a zarr directory; choose another output")
    try:
        root = zarr.open_group(str(path), mode="r+")
    except (zarr.errors.GroupNotFoundError, FileNotFoundError) as e:
        raise ValueError(f"{path} exists but is not a zarr group; choose another output") from e
    if "data" not in root or "meta" not in root or "episode_ends" not in root["meta"]:
        if len(list(root.keys())) == 0:
            return ReplayBuffer.create_from_group(root), 0
        raise ValueError(f"{path} is a zarr group without data/ and meta/episode_ends; choose another output")
    data = dict(root["data"].arrays())
    lengths = [a.shape[0] for a in data.values()]
    ends_arr = root["meta"]["episode_ends"]
    ends = np.asarray(ends_arr[:], dtype=np.int64)
    k = committed_episodes(ends, min(lengths) if lengths else 0)
    n_steps = int(ends[k - 1]) if k else 0
    dropped = max(lengths, default=0) - n_steps
    if k != len(ends) or any(n != n_steps for n in lengths):
        for arr in data.values():
            arr.resize((n_steps, *arr.shape[1:]))
        # rewritten whole, so entries past the end read 0 again (see the module docstring)
        root["meta"].create_array(
            "episode_ends", data=ends[:k], chunks=(ENDS_CHUNK,), overwrite=True, compressors=None
        )
    return ReplayBuffer(root), dropped


def append_episode(buffer: ReplayBuffer, episode: dict[str, np.ndarray], compressors="disk") -> None:
    """``buffer.add_episode`` with SIGINT / SIGTERM held until it is done; a signal that arrived meanwhile is
    raised afterwards as :class:`RunInterrupted`."""
    with shutdown.stop_signals_handled():
        buffer.add_episode(episode, compressors=compressors)
        signum = shutdown.requested()
    if signum is not None:
        raise RunInterrupted(signum)
