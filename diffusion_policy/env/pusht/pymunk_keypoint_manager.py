"""Object-local keypoints for PushT and their mapping to world (pixel) coordinates.

The default keypoints are the output of the original generator (farthest-point sampling over the
rendered pixels of each object at its default pose, ``default_rng(0)``, plus uniform jitter): 9 on
the T block and 3 on the agent. They are stored as constants because re-deriving them needs the
original's exact sampling; the values are what the PushT demonstrations' ``keypoint`` array uses.
"""

from __future__ import annotations

from collections.abc import Mapping

import cv2
import numpy as np

BLOCK_KEYPOINTS = np.array(
    [
        [9.2698, 90.0410],
        [-60.9835, -1.1867],
        [60.9128, -1.3934],
        [-0.2705, 25.5436],
        [-14.0649, 122.8159],
        [39.0027, 32.8574],
        [-39.9664, 32.7297],
        [-16.8243, 62.8632],
        [23.5415, -1.7003],
    ]
)
AGENT_KEYPOINTS = np.array([[-9.5773, 3.0283], [14.1243, -2.3294], [-1.3528, -14.3846]])

# matplotlib's tab10 palette, as uint8 RGB (avoids depending on matplotlib's colormap registry)
TAB10 = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)


def default_local_keypoint_map() -> dict[str, np.ndarray]:
    """{'block': (9, 2), 'agent': (3, 2)} object-local keypoints in pixels (copies)."""
    return {"block": BLOCK_KEYPOINTS.copy(), "agent": AGENT_KEYPOINTS.copy()}


def default_color_map(names=("block", "agent")) -> dict[str, np.ndarray]:
    """One tab10 colour (uint8 RGB) per object name, in order."""
    return {name: np.array(TAB10[i % len(TAB10)], dtype=np.uint8) for i, name in enumerate(names)}


class PymunkKeypointManager:
    """Maps object-local keypoints to world coordinates and draws them.

    Args:
        local_keypoint_map: object name -> (K, 2) local keypoints (pixels, body frame).
        color_map: object name -> RGB colour (0..255) used by :meth:`draw_keypoints`.
    """

    def __init__(self, local_keypoint_map: Mapping[str, np.ndarray], color_map: Mapping | None = None):
        self.local_keypoint_map = {}
        for name, kps in local_keypoint_map.items():
            arr = np.asarray(kps, dtype=np.float64)
            if arr.ndim != 2 or arr.shape[1] != 2 or not np.all(np.isfinite(arr)):
                raise ValueError(
                    f"local_keypoint_map[{name!r}] must be a finite (K, 2) array, got shape {arr.shape}"
                )
            self.local_keypoint_map[name] = arr
        if color_map is None:
            color_map = default_color_map(tuple(self.local_keypoint_map))
        missing = set(self.local_keypoint_map) - set(color_map)
        if missing:
            raise ValueError(f"color_map lacks a colour for {sorted(missing)}")
        self.color_map = {k: tuple(int(c) for c in np.asarray(v)[:3]) for k, v in color_map.items()}

    @staticmethod
    def to_world(local: np.ndarray, position, angle: float) -> np.ndarray:
        """``R(angle) @ local + position`` for (K, 2) points; returns (K, 2) float64."""
        c, s = np.cos(angle), np.sin(angle)
        rot = np.array([[c, -s], [s, c]])
        return local @ rot.T + np.asarray(position, dtype=np.float64)

    def get_keypoints_global(self, pose_map: Mapping[str, tuple]) -> dict[str, np.ndarray]:
        """pose_map: name -> (origin position (2,), angle). Returns name -> (K, 2) world keypoints."""
        return {name: self.to_world(self.local_keypoint_map[name], *pose) for name, pose in pose_map.items()}

    def draw_keypoints(
        self, img: np.ndarray, kps_map: Mapping[str, np.ndarray], radius: int = 1
    ) -> np.ndarray:
        """Draw world keypoints (pixels in the 512 window) as filled dots on ``img`` (H, W, 3) in place."""
        scale = img.shape[0] / 512.0
        for name, kps in kps_map.items():
            color = self.color_map[name]
            for x, y in np.asarray(kps) * scale:
                cv2.circle(img, (int(x), int(y)), max(1, int(radius)), color, -1)
        return img
