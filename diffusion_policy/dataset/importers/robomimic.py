"""robomimic hdf5 demonstrations (``data/demo_<i>/obs/<key>``, ``data/demo_<i>/actions``, ``mask/<split>``).

Episodes are the ``demo_<i>`` groups in the order of ``i``; observation keys keep their names (an obs named
``action`` is refused), ``actions`` becomes ``data/action``. ``mask/valid`` (demo names as bytes) becomes
``meta/val_mask``, which ``ZarrSequenceDataset`` uses as its split.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from diffusion_policy.common.errors import first_line
from diffusion_policy.dataset.importers.writer import ACTION_KEY, Source, SourceError

DEMO_NAME = re.compile(r"^demo_(\d+)$")
VALID_MASK = "mask/valid"


def _h5py():
    try:
        import h5py
    except ImportError:
        raise SourceError(
            "reading robomimic files needs h5py: pip install -e '.[importers]' (or pip install h5py)"
        ) from None
    return h5py


def open_robomimic(
    path: str | Path, obs_keys: Sequence[str] | None = None, action_key: str = "actions"
) -> Source:
    """Check ``path``'s structure and return its episodes as a stream (the file stays open until the
    stream ends)."""
    h5py = _h5py()
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise SourceError(f"{path}: not a readable HDF5 file ({first_line(e)})") from None
    try:
        demos, keys, val_mask = _check(f, path, obs_keys, action_key)
    except BaseException:
        f.close()
        raise
    if ACTION_KEY in keys:
        f.close()
        raise SourceError(f"{path}: an observation key is named {ACTION_KEY!r}, which the action uses")
    return Source(
        description=path.name,
        n_episodes=len(demos),
        episodes=_episodes(f, path, demos, keys, action_key),
        val_mask=val_mask,
        key_names={**{k: k for k in keys}, action_key: ACTION_KEY},
    )


def _check(f, path: Path, obs_keys, action_key):
    h5py = _h5py()
    if "data" not in f or not isinstance(f["data"], h5py.Group):
        raise SourceError(f"{path}: group 'data' is missing; a robomimic file has data/demo_<i>/...")
    names = [n for n in f["data"] if DEMO_NAME.match(n)]
    if not names:
        raise SourceError(f"{path}: data/ has no demo_<i> groups")
    demos = sorted(names, key=lambda n: int(DEMO_NAME.match(n).group(1)))
    first = f["data"][demos[0]]
    if "obs" not in first:
        raise SourceError(f"{path}: data/{demos[0]}/obs is missing")
    keys = list(obs_keys) if obs_keys else sorted(first["obs"].keys())
    for name in demos:
        demo = f["data"][name]
        where = f"data/{name}"
        if action_key not in demo:
            raise SourceError(f"{path}: {where}/{action_key} is missing")
        n = demo[action_key].shape[0]
        if "num_samples" in demo.attrs and int(demo.attrs["num_samples"]) != n:
            raise SourceError(
                f"{path}: {where} has num_samples={int(demo.attrs['num_samples'])} but {n} actions"
            )
        for key in keys:
            if "obs" not in demo or key not in demo["obs"]:
                raise SourceError(f"{path}: {where}/obs/{key} is missing (have: {_members(demo, 'obs')})")
            arr = demo["obs"][key]
            if arr.shape[:1] != (n,):
                raise SourceError(
                    f"{path}: {where}/obs/{key} has {arr.shape[0] if arr.shape else 0} steps, "
                    f"{where}/{action_key} has {n}"
                )
    val_mask = None
    if VALID_MASK in f:
        valid = {v.decode() if isinstance(v, bytes) else str(v) for v in f[VALID_MASK][()]}
        unknown = sorted(valid - set(demos))
        if unknown:
            raise SourceError(f"{path}: {VALID_MASK} names demos that data/ lacks: {unknown[:5]}")
        val_mask = np.array([n in valid for n in demos], dtype=bool)
    return demos, keys, val_mask


def _episodes(f, path: Path, demos, keys, action_key) -> Iterator[dict[str, np.ndarray]]:
    try:
        for name in demos:
            demo = f["data"][name]
            episode = {}
            for key, ds in [*((k, demo["obs"][k]) for k in keys), (ACTION_KEY, demo[action_key])]:
                try:
                    episode[key] = ds[()]
                except (OSError, ValueError) as e:
                    raise SourceError(f"{path}: cannot read {ds.name} ({first_line(e)})") from None
            yield episode
    finally:
        f.close()


def _members(group, name: str) -> list[str]:
    return sorted(group[name].keys()) if name in group else []
