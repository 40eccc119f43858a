"""Checkpoint files: written atomically, read without unpickling arbitrary objects.

A checkpoint is a ``torch.save``d dict that holds only tensors and plain Python values::

    {"format": "diffusion_policy.checkpoint", "version": 1,
     "cfg_yaml": <fully resolved config as YAML text>,
     "state_dicts": {"model": ..., "ema_model": ..., "optimizer": ..., ...},
     "state": {"epoch": int, "global_step": int, "rng": {...}, "wandb_run_id": str | None, ...}}

so it loads with ``torch.load(weights_only=True)``: a crafted pickle cannot run code, and the original's dill
checkpoints (which are pickles of OmegaConf objects) are refused with a message instead of executed;
``convert_checkpoint.py`` (``diffusion_policy.common.legacy_checkpoint``) reads those safely and converts.
"""

from __future__ import annotations

import errno
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from diffusion_policy.common.errors import CheckpointError

FORMAT = "diffusion_policy.checkpoint"
VERSION = 1


def save_checkpoint_file(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``payload`` to ``path`` so that a reader (or a crash) never sees a partial file.

    The bytes go to a temporary file in the same directory, are fsynced, then ``os.replace``d over ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, **payload}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        # torch's zip writer re-raises a full disk as a RuntimeError about positions; say what happened
        if _disk_full(e):
            kept = f"the previous {path.name} is untouched" if path.exists() else "nothing was written"
            raise CheckpointError(
                f"no space left on the device holding {path.parent} while writing {path.name}; {kept}; "
                "free space there or keep fewer checkpoints (checkpoint.topk.k)"
            ) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return path.absolute()


def _disk_full(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__context__ or e.__cause__
    return False


def remove_stale_temp_files(directory: str | os.PathLike) -> None:
    """Delete temp files left by a process killed while saving."""
    directory = Path(directory)
    if directory.is_dir():
        for tmp in directory.glob(".*.tmp-*"):
            tmp.unlink(missing_ok=True)


def load_checkpoint_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint_file``; anything else raises ``CheckpointError``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {path} refused: it holds pickled Python objects that a safe load will not run "
            f"({first[:160]}). A checkpoint written by the original code (dill) can be converted safely: "
            "python convert_checkpoint.py ORIGINAL.ckpt OUT.ckpt"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError) as e:
        raise CheckpointError(
            f"checkpoint {path} is truncated or not a torch checkpoint ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else 'no detail'})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {path} is not a diffusion_policy checkpoint (no '{FORMAT}' marker); "
            "was it written by another program?"
        )
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {payload.get('version')}; this code reads {VERSION}"
        )
    for key in ("cfg_yaml", "state_dicts", "state"):
        if key not in payload:
            raise CheckpointError(f"checkpoint {path} is missing its '{key}' entry")
    return payload
