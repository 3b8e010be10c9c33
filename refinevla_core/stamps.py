"""ROS time stamps <-> integer nanoseconds, for every module that pairs, ages or writes stamped messages.

Duck-typed (anything with `sec` and `nanosec`: builtin_interfaces/Time from rclpy or rosbags, or its JSON form), so
the core stays ROS-free; nodes build their Time message from `split_ns`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

NS_PER_S = 1_000_000_000


def stamp_to_ns(stamp: Any) -> int:
    """A builtin_interfaces/Time (`.sec`, `.nanosec`), or its JSON form {"sec": ..., "nanosec": ...} -> nanoseconds."""
    if isinstance(stamp, Mapping):
        return int(stamp["sec"]) * NS_PER_S + int(stamp["nanosec"])
    return int(stamp.sec) * NS_PER_S + int(stamp.nanosec)


def split_ns(ns: int) -> tuple[int, int]:
    """Nanoseconds -> (sec, nanosec) for a builtin_interfaces/Time."""
    return ns // NS_PER_S, ns % NS_PER_S
