"""Reading ``shape_meta["obs"]``, the single source of observation keys, shapes and types."""

from __future__ import annotations

from collections.abc import Mapping

OBS_TYPES = ("rgb", "low_dim")


def parse_obs_meta(obs_meta: Mapping[str, Mapping]) -> dict[str, tuple[tuple[int, ...], str]]:
    """``shape_meta["obs"]`` -> {key: (shape, type)} in its own order, with one-line errors for a missing
    shape, an unknown type (default ``low_dim``, as in the original) or an rgb shape that is not [C, H, W]."""
    parsed = {}
    for key, attr in obs_meta.items():
        if not isinstance(attr, Mapping) or "shape" not in attr:
            raise ValueError(f"shape_meta['obs']['{key}'] has no 'shape'; add e.g. shape: [2]")
        shape = tuple(int(s) for s in attr["shape"])
        obs_type = attr.get("type", "low_dim")
        if obs_type not in OBS_TYPES:
            raise ValueError(
                f"shape_meta['obs']['{key}'] has type '{obs_type}'; supported types are {list(OBS_TYPES)}"
            )
        if obs_type == "rgb" and len(shape) != 3:
            raise ValueError(
                f"shape_meta['obs']['{key}'] is rgb, so its shape {list(shape)} must be [C, H, W]"
            )
        parsed[key] = (shape, obs_type)
    return parsed
