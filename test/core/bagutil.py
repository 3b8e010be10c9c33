"""Helpers that write real ROS 2 bags with rosbags (the same library `refinevla record` uses) for the data tests.

Messages are built from rosbags' own type classes, so a bag here is byte-for-byte what a recorder would store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from refinevla_core.data.bag_storage import BagRecording, make_typestore

TYPESTORE = make_typestore()
T = TYPESTORE.types
S = 1_000_000_000  # ns per second
TOPIC_TYPES = {
    "/camera/image_raw": "sensor_msgs/msg/Image",
    "/camera/compressed": "sensor_msgs/msg/CompressedImage",
    "/refinevla/instruction": "std_msgs/msg/String",
    "/refinevla/ee_delta": "refinevla/msg/EndEffectorDelta",
    "/refinevla/gripper": "std_msgs/msg/Float64",
    "/refinevla/action": "refinevla/msg/Action",
    "/refinevla/episode_status": "refinevla/msg/EpisodeStatus",
}


def header(stamp_ns: int = 0, frame_id: str = "") -> Any:
    return T["std_msgs/msg/Header"](
        stamp=T["builtin_interfaces/msg/Time"](sec=stamp_ns // S, nanosec=stamp_ns % S), frame_id=frame_id
    )


def image(rgb: np.ndarray, stamp_ns: int = 0, encoding: str = "rgb8") -> Any:
    px = rgb[:, :, ::-1] if encoding == "bgr8" else rgb
    return T["sensor_msgs/msg/Image"](
        header=header(stamp_ns, "camera"), height=rgb.shape[0], width=rgb.shape[1], encoding=encoding,
        is_bigendian=0, step=rgb.shape[1] * 3, data=np.ascontiguousarray(px).reshape(-1).copy(),
    )


def compressed_png(rgb: np.ndarray, stamp_ns: int = 0) -> Any:
    import io

    from PIL import Image as PILImage

    out = io.BytesIO()
    PILImage.fromarray(rgb).save(out, format="PNG")
    return T["sensor_msgs/msg/CompressedImage"](
        header=header(stamp_ns, "camera"), format="png", data=np.frombuffer(out.getvalue(), np.uint8).copy()
    )


def delta(a: np.ndarray | list[float], stamp_ns: int = 0) -> Any:
    x, y, z, r, p, w = (float(v) for v in list(a)[:6])
    return T["refinevla/msg/EndEffectorDelta"](header=header(stamp_ns, "base_link"), x=x, y=y, z=z, roll=r,
                                               pitch=p, yaw=w)


def action(a: np.ndarray | list[float], stamp_ns: int = 0, safe_hold: bool = False, step: int = 0) -> Any:
    return T["refinevla/msg/Action"](
        header=header(stamp_ns, "base_link"), delta=delta(a, stamp_ns), gripper=float(a[6]), step=step,
        inference_latency_ms=1.0, rationale_id=0, safe_hold=safe_hold, guard_reason="hold" if safe_hold else "",
        rationale_age_steps=-1, rationale_age_s=-1.0,  # msg/Action.msg: -1 = no rationale with this step
    )


def string(text: str) -> Any:
    return T["std_msgs/msg/String"](data=text)


def float64(v: float) -> Any:
    return T["std_msgs/msg/Float64"](data=float(v))


def status(episode: int, step: int, success: bool, seed: int = 7, task: str = "PushCube-v1") -> Any:
    return T["refinevla/msg/EpisodeStatus"](
        header=header(), task=task, instruction="", seed=seed, episode=episode, step=step, max_steps=50,
        reward=0.0, success=success, ever_success=success, done=False,
    )


def frame_rgb(k: int, h: int = 12, w: int = 16) -> np.ndarray:
    """A distinct, deterministic image per k."""
    rng = np.random.default_rng(1000 + k)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@dataclass
class Timeline:
    """Messages to write (time-ordered by the writer) and the frames a correct conversion must produce."""

    events: list[tuple[int, str, Any]] = field(default_factory=list)
    expected: list[dict[str, Any]] = field(default_factory=list)  # per episode: instruction, actions, images

    def add(self, t_ns: int, topic: str, msg: Any) -> None:
        self.events.append((t_ns, topic, msg))


def demo_timeline(episodes: list[tuple[str, int]], t0: int = 10 * S, period: int = S // 5) -> Timeline:
    """Episodes of (instruction, steps) at 5 Hz, the teleop layout: instruction, then per step an image,
    20 ms later the EE delta, 5 ms after that the gripper. Each step's frame = that step's image."""
    tl = Timeline()
    t = t0
    k = 0
    for instruction, steps in episodes:
        tl.add(t, "/refinevla/instruction", string(instruction))
        t += period
        exp = {"instruction": instruction, "actions": [], "images": []}
        for s in range(steps):
            rgb = frame_rgb(k)
            a = np.array([0.01 * s, -0.002 * k, 0.003, 0.01, -0.02, 0.03 * s, float(s % 2)], np.float32)
            tl.add(t, "/camera/image_raw", image(rgb, t))
            tl.add(t + 20_000_000, "/refinevla/ee_delta", delta(a, t))
            tl.add(t + 25_000_000, "/refinevla/gripper", float64(a[6]))
            exp["actions"].append(a)
            exp["images"].append(rgb)
            t += period
            k += 1
        tl.expected.append(exp)
    return tl


def write_bag(path: Path, events: list[tuple[int, str, Any]], storage: str = "mcap",
              topic_types: dict[str, str] | None = None) -> Path:
    types = {**TOPIC_TYPES, **(topic_types or {})}
    with BagRecording(path, storage=storage, typestore=TYPESTORE) as rec:
        for topic in dict.fromkeys(topic for _, topic, _ in events):
            rec.add_topic(topic, types[topic])
        for t, topic, msg in sorted(events, key=lambda e: e[0]):
            rec.write_message(topic, t, msg)
    return path
