"""Interface of image-observation env runners (same contract as the low-dim one)."""

from __future__ import annotations

from typing import Any


class BaseImageRunner:
    def __init__(self, output_dir: str):
        self.output_dir = output_dir

    def run(self, policy: Any) -> dict[str, Any]:
        """Roll ``policy`` out and return a flat dict of metrics and mp4 paths."""
        raise NotImplementedError
