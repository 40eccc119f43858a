"""One PNG strip of evenly spaced frames from each rollout video, for documents that cannot play an mp4.

Each row is one video (its file name on the left is not drawn; rows keep the order given). The first frame,
the last frame and ``--frames - 2`` frames evenly spaced between them are kept, so a row shows how the
episode went from reset to its end.

    python -m benchmarks.video_filmstrip RUN/media/test_100000_run0000.mp4 RUN/media/test_100001_run0000.mp4 \
        --frames 8 --out docs/img/pusht_image_cpu_rollouts.png
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import av
import numpy as np
from PIL import Image


def read_frames(path: str) -> list[np.ndarray]:
    """All frames of an mp4 as (H, W, 3) uint8 RGB arrays."""
    with av.open(path) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def pick(frames: list[np.ndarray], n: int) -> list[np.ndarray]:
    """``n`` frames evenly spaced from the first to the last (all of them if there are fewer)."""
    if len(frames) <= n:
        return list(frames)
    idx = np.linspace(0, len(frames) - 1, n).round().astype(int)
    return [frames[i] for i in idx]


def filmstrip(videos: list[str], n_frames: int, gap: int = 2) -> np.ndarray:
    """One row of frames per video, white gaps between tiles.

    Returns uint8 (rows * (H + gap) - gap, n_frames * (W + gap) - gap, 3).
    """
    rows = [pick(read_frames(v), n_frames) for v in videos]
    for video, row in zip(videos, rows):
        if not row:
            raise ValueError(f"{video}: no video frames could be decoded")
    h, w, _ = rows[0][0].shape
    out = np.full((len(rows) * (h + gap) - gap, n_frames * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, frame in enumerate(row):
            if frame.shape != (h, w, 3):
                raise ValueError(f"{videos[r]}: frames of {frame.shape[:2]}, the first video has {(h, w)}")
            out[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = frame
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("videos", nargs="+", help="mp4 files, one row each")
    parser.add_argument("--frames", type=int, default=8, help="frames per row (default 8)")
    parser.add_argument("--out", required=True, help="PNG to write (written atomically)")
    args = parser.parse_args(argv)
    if args.frames < 2:
        parser.error(f"--frames={args.frames} must be >= 2 (the first and the last frame)")
    missing = [v for v in args.videos if not os.path.isfile(v)]
    if missing:
        parser.error(f"no such video: {missing[0]}")
    try:
        strip = filmstrip(args.videos, args.frames)
    except (ValueError, av.error.FFmpegError) as e:
        parser.error(f"cannot make the strip: {e}")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=out_dir)
    os.close(fd)
    try:
        Image.fromarray(strip).save(tmp, format="PNG")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; the PNG is for sharing
        os.replace(tmp, args.out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    h, w = strip.shape[:2]
    print(f"wrote {args.out}: {len(args.videos)} rows x {args.frames} frames, {w}x{h} px")
    return 0


if __name__ == "__main__":
    sys.exit(main())
