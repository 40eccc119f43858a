"""PushT with image observations (what the image PushT policies see)."""

from __future__ import annotations

import numpy as np
from gymnasium import spaces

from diffusion_policy.env.pusht.pusht_env import WINDOW_SIZE, PushTEnv


class PushTImageEnv(PushTEnv):
    """Observation: ``{"image": float32 (3, S, S) in [0, 1], "agent_pos": float32 (2,)}``, S = render_size.

    The observation image never shows the action marker (as in the recorded ``data/img``);
    ``render()`` returns the same frame as uint8 (S, S, 3) with the latest target drawn as a red
    cross, for videos. The frame is rendered once per step and reused by ``render()``.
    """

    def __init__(
        self,
        legacy: bool = False,
        block_cog: tuple[float, float] | None = None,
        damping: float | None = None,
        render_size: int = 96,
        render_mode: str | None = "rgb_array",
    ):
        super().__init__(
            legacy=legacy,
            block_cog=block_cog,
            damping=damping,
            render_action=False,
            render_size=render_size,
            render_mode=render_mode,
        )
        s = self.render_size
        self.observation_space = spaces.Dict(
            {
                "image": spaces.Box(low=0.0, high=1.0, shape=(3, s, s), dtype=np.float32),
                "agent_pos": spaces.Box(low=0.0, high=float(WINDOW_SIZE), shape=(2,), dtype=np.float32),
            }
        )
        self._frame: np.ndarray | None = None

    def _get_obs(self) -> dict[str, np.ndarray]:
        self._frame = self._render_frame(draw_action=False)
        image = np.moveaxis(self._frame.astype(np.float32) / 255.0, -1, 0)
        return {"image": image, "agent_pos": np.array(self.agent.position, dtype=np.float32)}

    def render(self):
        if self.render_mode is None:
            raise RuntimeError("PushT: render() needs render_mode='rgb_array' (the env was built with None)")
        if self.space is None or self._frame is None:
            raise RuntimeError("PushT: call reset() before render()")
        img = self._frame.copy()
        if self.latest_action is not None:
            self._draw_action_marker(img)
        return img

    def close(self):
        super().close()
        self._frame = None
