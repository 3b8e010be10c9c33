"""`refinevla record`: camera, instruction, EE deltas and gripper from ROS 2 topics into a ROS 2 bag (rosbags).

The first step of the real-robot data loop (record -> `refinevla convert` -> annotate -> train -> launch), runnable
where `ros2 bag` is not installed (the pip ROS wheels have no rosbag2). It records serialized messages as they arrive
(`raw=True`: nothing is deserialized), one topic at a time as soon as a publisher for it appears, with the QoS its
publishers offer (a best-effort camera gets a best-effort subscription, the latched instruction a transient-local one,
so the instruction published before recording started is still recorded).

    refinevla record --out demo_bag                       # the topics of config/bag_topics.yaml, mcap storage
    refinevla record --out demo_bag --format sqlite3 --duration 60 --topics /camera/image_raw /refinevla/ee_delta

Stopping: Ctrl-C or SIGTERM finish the bag (index + metadata.yaml) and exit 0; so does --duration. After `kill -9`
the bag has no metadata.yaml, but everything up to the last flush (every --flush-every seconds) is on disk and
`refinevla convert` reads it (refinevla_core.data.bag_storage.open_bag). rclpy is imported inside run():
`refinevla --help` must work on machines without ROS.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from refinevla_core.config import ConfigError, load_config, parse_overrides
from refinevla_core.data.bag_storage import BagRecording, qos_profile
from refinevla_core.data.bag_topics import BagTopicsConfig
from refinevla_core.data.episode import DataError

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "config" / "bag_topics.yaml"
NODE_NAME = "refinevla_recorder"


def _message_class(msgtype: str) -> Any:
    """'sensor_msgs/msg/Image' -> the rclpy message class."""
    package, kind, name = msgtype.split("/")
    return getattr(importlib.import_module(f"{package}.{kind}"), name)


class TopicRecorder:
    """Subscribes (raw) to each wanted topic once a publisher appears, and writes every message to a BagRecording."""

    def __init__(self, node: Any, recording: BagRecording, topics: list[str], flush_every_s: float,
                 say: Callable[[str], None]) -> None:
        self.node = node
        self.recording = recording
        self.pending = list(topics)
        self.say = say
        self._warned: set[str] = set()
        self.subscriptions: list[Any] = []
        node.create_timer(0.2, self.discover)
        node.create_timer(flush_every_s, recording.flush)
        self.discover()

    def discover(self) -> None:
        from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

        for topic in list(self.pending):
            infos = self.node.get_publishers_info_by_topic(topic)
            if not infos:
                continue
            types = sorted({i.topic_type for i in infos})
            if len(types) != 1:
                self._warn_once(topic, f"{topic} has publishers of several types {types}; not recording it")
                continue
            msgtype = types[0]
            if not self.recording.knows_type(msgtype):
                self._warn_once(topic, f"{topic}: type {msgtype} is unknown to rosbags' Jazzy store; not recording it")
                self.pending.remove(topic)
                continue
            reliable = all(i.qos_profile.reliability == ReliabilityPolicy.RELIABLE for i in infos)
            latched = all(i.qos_profile.durability == DurabilityPolicy.TRANSIENT_LOCAL for i in infos)
            qos = QoSProfile(
                history=HistoryPolicy.KEEP_LAST, depth=100,
                reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
                durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE,
            )
            self.recording.add_topic(topic, msgtype, [qos_profile(reliable, latched, depth=1 if latched else 10)])
            self.subscriptions.append(self.node.create_subscription(
                _message_class(msgtype), topic, lambda data, topic=topic: self.on_message(topic, data), qos,
                raw=True,
            ))
            self.pending.remove(topic)
            self.say(f"recording {topic} [{msgtype}] ({'reliable' if reliable else 'best effort'}"
                     f"{', transient local' if latched else ''})")

    def on_message(self, topic: str, data: bytes) -> None:
        self.recording.write(topic, self.node.get_clock().now().nanoseconds, data)

    def _warn_once(self, key: str, text: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.say(f"warning: {text}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="bag folder to create (must not exist)")
    parser.add_argument("--topics", nargs="+", metavar="TOPIC",
                        help="topics to record (default: those named in the bag config, see config/bag_topics.yaml)")
    parser.add_argument("--format", choices=("mcap", "sqlite3"), default="mcap", help="bag storage (default mcap)")
    parser.add_argument("--config", type=Path, help="bag topic config YAML (default config/bag_topics.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                        help="override a bag config key, e.g. --set image_topic=/wrist/image_raw")
    parser.add_argument("--duration", type=float, help="stop after this many seconds (default: until Ctrl-C)")
    parser.add_argument("--flush-every", type=float, default=1.0, metavar="S",
                        help="seconds between flushes to disk; a kill -9 loses at most this much (default 1)")


def run(args: argparse.Namespace) -> int:
    def say(text: str) -> None:
        print(f"refinevla record: {text}", flush=True)

    try:
        path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
        config = load_config(BagTopicsConfig, path, parse_overrides(args.overrides))
        if args.duration is not None and args.duration <= 0:
            raise ConfigError("--duration must be positive")
        if args.flush_every <= 0:
            raise ConfigError("--flush-every must be positive")
        topics = list(dict.fromkeys(args.topics or config.record_topics()))
        recording = BagRecording(args.out, storage=args.format)
    except (ConfigError, DataError) as e:
        print(f"refinevla record: error: {e}", file=sys.stderr)
        return 1

    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.signals import SignalHandlerOptions

    stop: list[str] = []

    def request_stop(signum: int, _frame: Any) -> None:
        stop.append(signal.Signals(signum).name)

    try:
        rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
        node = rclpy.create_node(NODE_NAME)
    except Exception:
        recording.close()
        raise
    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    recorder: TopicRecorder | None = None
    try:
        recorder = TopicRecorder(node, recording, topics, args.flush_every, say)
        say(f"writing {args.out} ({args.format}); waiting for publishers of: {', '.join(recorder.pending) or '-'}")
        deadline = time.monotonic() + args.duration if args.duration else None
        while not stop and (deadline is None or time.monotonic() < deadline):
            executor.spin_once(timeout_sec=0.1)
    finally:
        executor.shutdown()
        node.destroy_node()
        recording.close()
        rclpy.try_shutdown()
        for s, handler in previous.items():
            signal.signal(s, handler)
    reason = f"on {stop[0]}" if stop else "after --duration"
    counts = ", ".join(f"{t} {n}" for t, n in recording.counts.items()) or "nothing"
    say(f"stopped {reason}; wrote {args.out}: {counts}")
    if recorder is not None and recorder.pending:
        say(f"warning: no publisher ever appeared for {', '.join(recorder.pending)}")
    if not recording.counts:
        say("warning: no messages were recorded; check the topic names (ros2 topic list) and ROS_DOMAIN_ID")
        return 1
    say(f"next: refinevla convert --bag {args.out} --out DATASET")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="refinevla record", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
