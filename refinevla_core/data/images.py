"""Camera image decoding shared by the live ROS nodes and the bag reader: one set of checks for both paths.

A sensor_msgs/Image is described by its fields (encoding, height, width, step, data) whether it came from rclpy or
from a bag via rosbags, so decoding works on those fields. Every check names the fix, because a driver with a wrong
encoding or step must give a clear warning, never a garbled image fed to the policy (and from there an arm motion).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

# encoding -> (channels, order of R,G,B within the pixel, or None for grey)
ENCODINGS: dict[str, tuple[int, tuple[int, int, int] | None]] = {
    "rgb8": (3, (0, 1, 2)),
    "bgr8": (3, (2, 1, 0)),
    "rgba8": (4, (0, 1, 2)),
    "bgra8": (4, (2, 1, 0)),
    "mono8": (1, None),
    "8UC3": (3, (0, 1, 2)),  # OpenCV type name; assumed RGB as cv_bridge passes it through
    "8UC1": (1, None),
}
SUPPORTED_ENCODINGS = tuple(ENCODINGS)
MAX_IMAGE_PIXELS = 4096 * 4096


class ImageConversionError(ValueError):
    """The image cannot be turned into an RGB array; the message names the fix."""


def _as_uint8(data: Any) -> np.ndarray:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(data, np.uint8)
    return np.asarray(data, dtype=np.uint8).reshape(-1)


def raw_to_rgb(encoding: str, height: int, width: int, step: int, data: Any) -> np.ndarray:
    """The fields of a sensor_msgs/Image -> HxWx3 uint8 RGB (a copy: message buffers may be reused)."""
    if encoding not in ENCODINGS:
        raise ImageConversionError(
            f"camera image encoding {encoding!r} is not supported; publish one of {', '.join(SUPPORTED_ENCODINGS)} "
            "(or a sensor_msgs/CompressedImage with image_transport:=compressed)"
        )
    h, w, step = int(height), int(width), int(step)
    if h <= 0 or w <= 0:
        raise ImageConversionError(f"camera image is {w}x{h}: width and height must be positive")
    if h * w > MAX_IMAGE_PIXELS:
        raise ImageConversionError(f"camera image is {w}x{h}, larger than the {MAX_IMAGE_PIXELS} pixel limit")
    channels, order = ENCODINGS[encoding]
    row_bytes = w * channels
    if step < row_bytes:
        raise ImageConversionError(
            f"camera image step {step} is smaller than width*channels = {row_bytes} for {encoding} {w}x{h}; "
            "the driver sets a wrong step"
        )
    buf = _as_uint8(data)
    if buf.size < step * h:
        raise ImageConversionError(
            f"camera image data has {buf.size} bytes, expected step*height = {step}*{h} = {step * h}; "
            "the message is truncated"
        )
    px = buf[: step * h].reshape(h, step)[:, :row_bytes].reshape(h, w, channels)
    if order is None:
        return np.repeat(px, 3, axis=2)
    return np.ascontiguousarray(px[:, :, list(order)])


def compressed_to_rgb(data: Any, fmt: str = "") -> np.ndarray:
    """The data of a sensor_msgs/CompressedImage (jpeg/png) -> HxWx3 uint8 RGB."""
    from PIL import Image as PILImage

    raw = _as_uint8(data).tobytes()
    if not raw:
        raise ImageConversionError("compressed camera image is empty")
    try:
        with PILImage.open(io.BytesIO(raw)) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise ImageConversionError(f"compressed image is {im.width}x{im.height}, over the pixel limit")
            return np.asarray(im.convert("RGB")).copy()
    except ImageConversionError:
        raise
    except Exception as e:  # PIL raises many types for corrupt data
        raise ImageConversionError(
            f"compressed camera image (format {fmt!r}) could not be decoded: {e}; publish jpeg or png"
        ) from e


def resize_rgb(rgb: np.ndarray, size: Sequence[int] | None) -> np.ndarray:
    """Resize to (height, width) with bilinear filtering; None or the same size returns the array unchanged."""
    if not size or tuple(rgb.shape[:2]) == tuple(size):
        return rgb
    from PIL import Image as PILImage

    return np.asarray(PILImage.fromarray(rgb).resize((int(size[1]), int(size[0])), PILImage.BILINEAR))
