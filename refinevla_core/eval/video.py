"""Episode videos with the policy's rationale as a caption under every frame: the fastest way to see whether what
the model says matches what it does.

mp4 (H.264 via PyAV, the library the project already uses for LeRobot videos); animated GIF (Pillow) when PyAV or
its encoder is missing.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PANEL_LINES = 7


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def captioned_frame(image: np.ndarray, header: str, caption: str, size: int = 256) -> np.ndarray:
    """The frame scaled to size x size (nearest: pixels stay visible) above a text panel: header line + caption."""
    font = _font(11)
    line_h = 13
    panel_h = line_h * (PANEL_LINES + 1) + 8
    panel_h += panel_h % 2  # H.264 wants even sizes
    canvas = Image.new("RGB", (size, size + panel_h), (20, 20, 20))
    canvas.paste(Image.fromarray(np.asarray(image, dtype=np.uint8)).resize((size, size), Image.NEAREST), (0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, size + 3), header, fill=(255, 220, 120), font=font)
    chars = max(20, int(size / 5.6))
    lines = textwrap.wrap(" ".join(caption.split()), chars) or ["(no rationale)"]
    if len(lines) > PANEL_LINES:
        lines = [*lines[: PANEL_LINES - 1], lines[PANEL_LINES - 1][: chars - 3] + "..."]
    for i, line in enumerate(lines):
        draw.text((4, size + 3 + line_h * (i + 1)), line, fill=(235, 235, 235), font=font)
    return np.asarray(canvas)


def write_video(path: Path, frames: Sequence[np.ndarray], fps: float = 5.0) -> Path:
    """Write frames (HxWx3 uint8, all the same size) as mp4; falls back to .gif. Returns the path written."""
    if not frames:
        raise ValueError(f"no frames to write to {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import av

        with av.open(str(path.with_suffix(".mp4")), mode="w") as container:
            try:
                stream = container.add_stream("libx264", rate=round(fps))
            except (ValueError, av.error.FFmpegError):  # an ffmpeg build without x264
                stream = container.add_stream("mpeg4", rate=round(fps))
            stream.height, stream.width = frames[0].shape[:2]
            stream.pix_fmt = "yuv420p"
            for f in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        return path.with_suffix(".mp4")
    except ImportError:
        gif = path.with_suffix(".gif")
        images = [Image.fromarray(f) for f in frames]
        images[0].save(gif, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        return gif
