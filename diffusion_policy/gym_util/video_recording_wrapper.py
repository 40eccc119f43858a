"""Records the frames of an episode to mp4 while it runs."""

from __future__ import annotations

from typing import Any

import gymnasium as gym

from diffusion_policy.gym_util.video_recorder import VideoRecorder


class VideoRecordingWrapper(gym.Wrapper):
    """Writes ``env.render()`` after every ``steps_per_render``-th step to ``file_path``.

    The path is set per episode through ``reset(options={"video_path": path})`` (or the
    ``file_path`` attribute); ``None`` records nothing and costs nothing (no rendering). The reset
    frame is not recorded, so an episode of N steps gives N frames (steps_per_render=1).
    ``stop_recording()`` finishes the file and returns its path.
    """

    def __init__(
        self,
        env: gym.Env,
        video_recoder: VideoRecorder | None = None,
        mode: str = "rgb_array",
        file_path: str | None = None,
        steps_per_render: int = 1,
        video_recorder: VideoRecorder | None = None,
    ):
        super().__init__(env)
        recorder = video_recorder if video_recorder is not None else video_recoder
        if recorder is None:
            raise ValueError(
                "VideoRecordingWrapper needs a video_recorder (e.g. VideoRecorder.create_h264(fps=10))"
            )
        if mode != "rgb_array":
            raise ValueError(f"unknown render mode {mode!r}; only 'rgb_array' can be recorded")
        if steps_per_render < 1:
            raise ValueError(f"steps_per_render must be >= 1, got {steps_per_render!r}")
        self.video_recorder = recorder
        self.mode = mode
        self.file_path = file_path
        self.steps_per_render = int(steps_per_render)
        self.step_count = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        self.video_recorder.stop()
        if options and "video_path" in options:
            options = dict(options)
            self.file_path = options.pop("video_path")
        self.step_count = 0
        return self.env.reset(seed=seed, options=options or None)

    def step(self, action):
        result = self.env.step(action)
        self.step_count += 1
        if self.file_path is not None and self.step_count % self.steps_per_render == 0:
            if not self.video_recorder.is_ready():
                self.video_recorder.start(self.file_path)
            self.video_recorder.write_frame(self.env.render())
        return result

    def stop_recording(self) -> str | None:
        """Finish the current file; returns its path or None when this episode was not recorded."""
        return self.video_recorder.stop()

    def close(self):
        self.video_recorder.stop()
        super().close()
