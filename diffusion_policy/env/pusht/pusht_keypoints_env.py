"""PushT with keypoint observations (what the low-dim PushT policies see)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from gymnasium import spaces

from diffusion_policy.env.pusht.pusht_env import WINDOW_SIZE, PushTEnv
from diffusion_policy.env.pusht.pymunk_keypoint_manager import (
    PymunkKeypointManager,
    default_color_map,
    default_local_keypoint_map,
)


class PushTKeypointsEnv(PushTEnv):
    """Observation: float64 (2*Do,) = ``[values (Do), visibility mask (Do)]``.

    With ``agent_keypoints=False`` (default) the values are the 9 block keypoints in world pixels
    (18, ``R(angle) @ local + block origin``) followed by the agent position (2): Do = 20. With
    ``agent_keypoints=True`` the 3 agent keypoints replace the agent position: Do = 24.
    Each keypoint is visible with probability ``keypoint_visible_rate`` (drawn from the env's
    generator every observation); invisible keypoints keep their values in the observation and only
    get mask 0. The agent position is always visible. Actions, reward and termination as PushTEnv.
    """

    def __init__(
        self,
        legacy: bool = False,
        block_cog: tuple[float, float] | None = None,
        damping: float | None = None,
        render_size: int = 96,
        keypoint_visible_rate: float = 1.0,
        agent_keypoints: bool = False,
        draw_keypoints: bool = False,
        reset_to_state: np.ndarray | None = None,
        render_action: bool = True,
        local_keypoint_map: Mapping[str, np.ndarray] | None = None,
        color_map: Mapping | None = None,
        render_mode: str | None = "rgb_array",
    ):
        super().__init__(
            legacy=legacy,
            block_cog=block_cog,
            damping=damping,
            render_action=render_action,
            render_size=render_size,
            reset_to_state=reset_to_state,
            render_mode=render_mode,
        )
        if not 0.0 <= float(keypoint_visible_rate) <= 1.0:
            raise ValueError(f"keypoint_visible_rate must be in [0, 1], got {keypoint_visible_rate!r}")
        if local_keypoint_map is None:
            local_keypoint_map = default_local_keypoint_map()
        for name in ("block", "agent") if agent_keypoints else ("block",):
            if name not in local_keypoint_map:
                raise ValueError(
                    f"local_keypoint_map needs a {name!r} entry, has {sorted(local_keypoint_map)}"
                )
        self.keypoint_visible_rate = float(keypoint_visible_rate)
        self.agent_keypoints = bool(agent_keypoints)
        self.draw_keypoints = bool(draw_keypoints)
        self.kp_manager = PymunkKeypointManager(local_keypoint_map, color_map)

        n_block = len(self.kp_manager.local_keypoint_map["block"])
        n_agent = len(self.kp_manager.local_keypoint_map["agent"]) if self.agent_keypoints else 1
        self.n_keypoints = n_block + n_agent
        dim = 2 * self.n_keypoints
        # the original declared [0, 512] for the values, but keypoints of a block placed near an edge
        # lie outside the window (the stem tip is 124 px from the body origin); bound them generously
        low = np.concatenate([np.full(dim, -float(WINDOW_SIZE)), np.zeros(dim)])
        high = np.concatenate([np.full(dim, 2.0 * WINDOW_SIZE), np.ones(dim)])
        self.observation_space = spaces.Box(low=low, high=high, shape=(2 * dim,), dtype=np.float64)
        self._draw_kp_map: dict[str, np.ndarray] = {}

    @staticmethod
    def genenerate_keypoint_manager_params() -> dict:
        """Keyword arguments with the default keypoints and colours (the original's spelling, kept
        so that code calling it keeps working)."""
        return PushTKeypointsEnv.generate_keypoint_manager_params()

    @staticmethod
    def generate_keypoint_manager_params() -> dict:
        """``{"local_keypoint_map": ..., "color_map": ...}`` for the constructor."""
        return {"local_keypoint_map": default_local_keypoint_map(), "color_map": default_color_map()}

    def _get_obs(self) -> np.ndarray:
        poses = {"block": (self.block.position, self.block.angle)}
        if self.agent_keypoints:
            poses["agent"] = (self.agent.position, self.agent.angle)
        kp_map = self.kp_manager.get_keypoints_global(poses)
        kps = np.concatenate(list(kp_map.values()), axis=0)
        n_kps = kps.shape[0]
        if self.keypoint_visible_rate < 1.0:
            visible = self.np_random.random(size=n_kps) < self.keypoint_visible_rate
        else:
            visible = np.ones(n_kps, dtype=bool)
        if self.draw_keypoints:
            shown = np.where(visible[:, None], kps, 0.0)
            n_block = len(kp_map["block"])
            self._draw_kp_map = {"block": shown[:n_block]}
            if self.agent_keypoints:
                self._draw_kp_map["agent"] = shown[n_block:]
        values = kps.reshape(-1)
        mask = np.repeat(visible, 2)
        if not self.agent_keypoints:
            values = np.concatenate([values, np.array(self.agent.position)])
            mask = np.concatenate([mask, np.ones(2, dtype=bool)])
        return np.concatenate([values, mask.astype(np.float64)])

    def _render_frame(self, draw_action: bool) -> np.ndarray:
        img = super()._render_frame(draw_action)
        if self.draw_keypoints:
            self.kp_manager.draw_keypoints(img, self._draw_kp_map, radius=int(img.shape[0] / 96))
        return img
