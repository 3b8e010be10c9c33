"""Message <-> core type conversions, one function each way (cv_bridge-style, in numpy: PyPI's cv_bridge is broken).

Every decoder validates what it is given, because a camera driver with a wrong encoding or a truncated buffer must
produce a clear warning, never a garbled image fed to the policy (and from there an arm motion).
"""

from __future__ import annotations

import io
import struct
from typing import Any

import numpy as np
from builtin_interfaces.msg import Time
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from refinevla.msg import EndEffectorDelta
from refinevla.msg import Rationale as RationaleMsg
from refinevla_core.data.images import (  # noqa: F401  (re-exported: nodes import them from here)
    SUPPORTED_ENCODINGS,
    ImageConversionError,
    raw_to_rgb,
)
from refinevla_core.data.images import compressed_to_rgb as compressed_bytes_to_rgb
from refinevla_core.rationale import Rationale
from refinevla_core.stamps import (
    NS_PER_S,
    split_ns,
    stamp_to_ns,  # noqa: F401  (re-exported: nodes import it from here)
)


def image_to_rgb(msg: Image) -> np.ndarray:
    """sensor_msgs/Image -> HxWx3 uint8 RGB (a copy: the message buffer may be reused by rclpy)."""
    return raw_to_rgb(msg.encoding, msg.height, msg.width, msg.step, msg.data)


def compressed_to_rgb(msg: CompressedImage) -> np.ndarray:
    """sensor_msgs/CompressedImage (jpeg/png) -> HxWx3 uint8 RGB."""
    return compressed_bytes_to_rgb(msg.data, msg.format)


def rgb_to_image(rgb: np.ndarray, header: Header | None = None, encoding: str = "rgb8") -> Image:
    """HxWx3 uint8 RGB -> sensor_msgs/Image (rgb8 or bgr8)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ImageConversionError(f"expected an HxWx3 uint8 array; got shape {rgb.shape} dtype {rgb.dtype}")
    if encoding == "bgr8":
        rgb = rgb[:, :, ::-1]
    elif encoding != "rgb8":
        raise ImageConversionError(f"rgb_to_image writes rgb8 or bgr8, not {encoding!r}")
    msg = Image()
    if header is not None:
        msg.header = header
    msg.height, msg.width = int(rgb.shape[0]), int(rgb.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = int(rgb.shape[1] * 3)
    msg.data = np.ascontiguousarray(rgb).tobytes()
    return msg


def rgb_to_compressed(
    rgb: np.ndarray, header: Header | None = None, fmt: str = "jpeg", quality: int = 90
) -> CompressedImage:
    from PIL import Image as PILImage

    out = io.BytesIO()
    PILImage.fromarray(rgb).save(out, format="JPEG" if fmt == "jpeg" else "PNG", quality=quality)
    msg = CompressedImage()
    if header is not None:
        msg.header = header
    msg.format = fmt
    msg.data = out.getvalue()
    return msg


def delta_to_msg(action: np.ndarray, header: Header | None = None) -> EndEffectorDelta:
    """The first six entries of a 7-D action (dx, dy, dz, droll, dpitch, dyaw[, gripper]) -> EndEffectorDelta."""
    a = np.asarray(action, dtype=np.float64).reshape(-1)
    if a.size < 6:
        raise ValueError(f"an EE delta needs 6 values (dx, dy, dz, droll, dpitch, dyaw); got {a.size}")
    if not np.all(np.isfinite(a[:6])):
        raise ValueError(f"EE delta has non-finite values {a[:6].tolist()}; refusing to build a motion message")
    msg = EndEffectorDelta()
    if header is not None:
        msg.header = header
    msg.x, msg.y, msg.z, msg.roll, msg.pitch, msg.yaw = (float(v) for v in a[:6])
    return msg


def msg_to_delta(msg: EndEffectorDelta) -> np.ndarray:
    """EndEffectorDelta -> float64[6] (dx, dy, dz, droll, dpitch, dyaw)."""
    return np.array([msg.x, msg.y, msg.z, msg.roll, msg.pitch, msg.yaw], dtype=np.float64)


def rationale_to_msg(r: Rationale | Any | None, header: Header | None = None, step: int = 0, rid: int = 0,
                     fresh: bool = True, *, text: str = "") -> RationaleMsg:
    """A Rationale -> refinevla/Rationale. Also takes generated text that did not parse (r None, or an object with
    some of the four sections as strings): the text is kept, missing sections are empty."""
    msg = RationaleMsg()
    if header is not None:
        msg.header = header
    for section in ("observation", "situation_analysis", "spatial_reasoning", "task_planning"):
        value = getattr(r, section, "")
        setattr(msg, section, value if isinstance(value, str) else "")
    msg.text = text or (r.text() if r is not None else "")
    msg.step = int(step)
    msg.id = int(rid)
    msg.fresh = bool(fresh)
    return msg


def msg_to_rationale(msg: RationaleMsg) -> Rationale:
    return Rationale(msg.observation, msg.situation_analysis, msg.spatial_reasoning, msg.task_planning)


def decode_text(data: str | bytes, max_chars: int) -> str:
    """An instruction from a std_msgs/String: must be non-empty after stripping and at most max_chars long."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"instruction is not valid UTF-8 ({e})") from e
    if "\ufffd" in data:  # rclpy decodes invalid UTF-8 on the wire as U+FFFD
        raise ValueError("instruction contains bytes that are not valid UTF-8 (shown as U+FFFD); publish UTF-8 text")
    text = " ".join(data.split())
    if not text:
        raise ValueError("instruction is empty")
    if len(text) > max_chars:
        raise ValueError(
            f"instruction has {len(text)} characters; the limit is {max_chars} (parameter max_instruction_chars)"
        )
    return text


def ns_to_time(ns: int) -> Time:
    sec, nanosec = split_ns(ns)
    return Time(sec=sec, nanosec=nanosec)


def serialized_stamp_ns(serialized: bytes) -> int:
    """The header stamp of a serialized message that starts with a std_msgs/Header (Image, CompressedImage), read
    without deserializing the rest (CDR: 4-byte encapsulation, then int32 sec, uint32 nanosec); 0 if too short."""
    if len(serialized) < 12:
        return 0
    sec, nanosec = struct.unpack_from("<iI" if serialized[1] == 1 else ">iI", serialized, 4)
    return sec * NS_PER_S + nanosec
