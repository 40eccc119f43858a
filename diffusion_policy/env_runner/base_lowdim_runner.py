"""Interface of low-dimensional env runners.

A runner only relies on the policy contract ``policy.reset()``,
``policy.predict_action(obs_dict) -> {"action": (B, Ta, Da)}`` and ``policy.device``;
it never imports a policy module.
"""

from __future__ import annotations

from typing import Any


class BaseLowdimRunner:
    def __init__(self, output_dir: str):
        self.output_dir = output_dir

    def run(self, policy: Any) -> dict[str, Any]:
        """Roll ``policy`` out and return a flat dict of metrics and mp4 paths."""
        raise NotImplementedError
