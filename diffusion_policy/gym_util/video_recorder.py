"""Streaming h264 mp4 writer on PyAV (frames are encoded as they arrive; nothing is buffered)."""

from __future__ import annotations

import contextlib
import os

import av
import numpy as np


class VideoRecorder:
    """Writes uint8 RGB frames (H, W, 3) to an mp4 file.

    The frame size is taken from the first frame; h264 needs even sizes, odd ones are rejected.
    Use ``start(path)``, ``write_frame(img)`` any number of times, then ``stop()``.
    """

    def __init__(
        self,
        fps: int,
        codec: str = "h264",
        input_pix_fmt: str = "rgb24",
        pix_fmt: str = "yuv420p",
        crf: int = 22,
        profile: str = "high",
        thread_type: str = "FRAME",
        thread_count: int = 1,
    ):
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps!r}")
        if not 0 <= int(crf) <= 51:
            raise ValueError(f"crf must be in [0, 51] for h264, got {crf!r}")
        self.fps = int(fps)
        self.codec = codec
        self.input_pix_fmt = input_pix_fmt
        self.pix_fmt = pix_fmt
        self.options = {"crf": str(int(crf)), "profile": profile}
        self.thread_type = thread_type
        self.thread_count = int(thread_count)
        self._container = None
        self._stream = None
        self.file_path: str | None = None
        self.n_frames = 0

    @classmethod
    def create_h264(
        cls, fps: int, codec: str = "h264", input_pix_fmt: str = "rgb24", crf: int = 22, **kwargs
    ):
        """Constructor with the original's name and argument order."""
        return cls(fps=fps, codec=codec, input_pix_fmt=input_pix_fmt, crf=crf, **kwargs)

    def is_ready(self) -> bool:
        """True while a file is open (between ``start`` and ``stop``)."""
        return self._container is not None

    def start(self, file_path: str) -> None:
        if self.is_ready():
            self.stop()
        os.makedirs(os.path.dirname(os.path.abspath(file_path)), exist_ok=True)
        self._container = av.open(file_path, mode="w")
        self._stream = None
        self.file_path = file_path
        self.n_frames = 0

    def write_frame(self, img: np.ndarray) -> None:
        if not self.is_ready():
            raise RuntimeError("VideoRecorder.write_frame() before start(path)")
        img = np.asarray(img)
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"video frames must be uint8 (H, W, 3), got {img.dtype} {img.shape}")
        if self._stream is None:
            h, w = img.shape[:2]
            if h % 2 or w % 2:
                raise ValueError(f"h264 needs even frame sizes, got {w}x{h}")
            stream = self._container.add_stream(self.codec, rate=self.fps, options=self.options)
            stream.width, stream.height, stream.pix_fmt = w, h, self.pix_fmt
            stream.codec_context.thread_type = self.thread_type
            stream.codec_context.thread_count = self.thread_count
            self._stream = stream
        elif img.shape[:2] != (self._stream.height, self._stream.width):
            raise ValueError(
                f"frame size changed mid-video: {img.shape[1]}x{img.shape[0]}, "
                f"expected {self._stream.width}x{self._stream.height}"
            )
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format=self.input_pix_fmt)
        self._container.mux(self._stream.encode(frame))
        self.n_frames += 1

    def stop(self) -> str | None:
        """Flush and close the file; returns its path (None if nothing was started)."""
        if not self.is_ready():
            return None
        try:
            if self._stream is not None:
                self._container.mux(self._stream.encode())
        finally:
            self._container.close()
            self._container = None
            self._stream = None
        return self.file_path

    def __del__(self):
        with contextlib.suppress(Exception):
            self.stop()
