"""Keep the k best checkpoints by a monitored metric (the original's ``TopKCheckpointManager``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class TopKCheckpointManager:
    """Decides whether a new checkpoint enters the top k, and deletes the one it displaces.

    ``format_str`` is formatted with the metric dict, e.g.
    ``'epoch={epoch:04d}-test_mean_score={test_mean_score:.3f}.ckpt'``. Unlike the original, a metric
    dict without ``monitor_key`` (a checkpoint epoch that is not a rollout epoch) is simply not ranked, and
    the ranking survives resume through ``state_dict()``.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        monitor_key: str,
        mode: str = "min",
        k: int = 1,
        format_str: str = "epoch={epoch:03d}-train_loss={train_loss:.3f}.ckpt",
    ):
        if mode not in ("max", "min"):
            raise ValueError(f"checkpoint.topk.mode={mode!r}: use 'max' or 'min'")
        if k < 0:
            raise ValueError(f"checkpoint.topk.k={k}: must be >= 0 (0 disables top-k checkpoints)")
        self.save_dir = Path(save_dir)
        self.monitor_key = monitor_key
        self.mode = mode
        self.k = k
        self.format_str = format_str
        # file name (relative to save_dir, so a moved run dir keeps working) -> monitored value
        self.path_value_map: dict[str, float] = {}

    def get_ckpt_path(self, data: dict[str, Any]) -> str | None:
        """Return the path to save the new checkpoint at, or None if it does not make the top k."""
        if self.k == 0 or self.monitor_key not in data:
            return None
        value = float(data[self.monitor_key])
        name = self.format_str.format(**data)
        if len(self.path_value_map) < self.k:
            self.path_value_map[name] = value
            return str(self.save_dir / name)

        ranked = sorted(self.path_value_map.items(), key=lambda kv: kv[1])
        worst_name, worst_value = ranked[0] if self.mode == "max" else ranked[-1]
        better = value > worst_value if self.mode == "max" else value < worst_value
        if not better:
            return None
        del self.path_value_map[worst_name]
        self.path_value_map[name] = value
        if worst_name != name:
            (self.save_dir / worst_name).unlink(missing_ok=True)
        return str(self.save_dir / name)

    def state_dict(self) -> dict[str, Any]:
        return {"path_value_map": dict(self.path_value_map)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.path_value_map = {str(k): float(v) for k, v in state["path_value_map"].items()}
