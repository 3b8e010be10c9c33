"""`refinevla-topic pub|echo|list`: publish and watch ROS 2 topics from Python, for users without the `ros2` command.

    refinevla-topic pub /refinevla/instruction std_msgs/msg/String "data: push the cube to the target"
    refinevla-topic echo /refinevla/rationale --count 3
    refinevla-topic list

A small, real rclpy client (not a wrapper around `ros2 topic`): `pub` waits for a subscriber, publishes with the QoS
of the project's topics (reliable + transient local for instructions, so a late policy node still gets it) and stays
up a moment so the message is delivered; `echo` finds the type from the graph and matches the publishers' QoS (best
effort for cameras). Messages are written and printed as YAML; long arrays (image data) are shortened.
"""

from __future__ import annotations

import argparse
import array
import importlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import yaml

MAX_ITEMS = 16  # longer sequences are shown as "<N items>" (an image is megabytes of numbers)


def message_type(name: str) -> Any:
    """'std_msgs/msg/String' or 'std_msgs/String' -> the message class."""
    parts = name.split("/")
    if len(parts) == 2:
        parts = [parts[0], "msg", parts[1]]
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"message type {name!r} must look like package/msg/Type, e.g. std_msgs/msg/String")
    try:
        return getattr(importlib.import_module(f"{parts[0]}.{parts[1]}"), parts[2])
    except (ImportError, AttributeError):
        raise ValueError(f"message type {name!r} is not installed here") from None


def to_plain(msg: Any) -> Any:
    """A message as plain YAML-able data (nested messages as mappings, arrays as lists, long ones shortened)."""
    if hasattr(msg, "get_fields_and_field_types"):
        return {name: to_plain(getattr(msg, name)) for name in msg.get_fields_and_field_types()}
    if isinstance(msg, (bytes, bytearray)):
        msg = list(msg)
    if isinstance(msg, (list, tuple, array.array, np.ndarray)):
        if len(msg) > MAX_ITEMS:
            return f"<{len(msg)} items>"
        return [to_plain(v) for v in msg]
    if isinstance(msg, np.generic):
        return msg.item()
    return msg


def fill(msg: Any, values: Any, where: str = "") -> Any:
    """Set a message's fields from a mapping (nested for nested messages); names the field that does not fit."""
    if not isinstance(values, dict):
        raise ValueError(f"{where or 'the message'}: expected a mapping of fields, got {values!r}")
    fields = msg.get_fields_and_field_types()
    for key, value in values.items():
        here = f"{where}.{key}" if where else key
        if key not in fields:
            raise ValueError(f"{type(msg).__name__} has no field {here!r}; its fields: {sorted(fields)}")
        current = getattr(msg, key)
        if hasattr(current, "get_fields_and_field_types"):
            fill(current, value, here)
            continue
        is_int = isinstance(value, int) and not isinstance(value, bool)
        field_value = float(value) if isinstance(current, float) and is_int else value
        try:
            setattr(msg, key, field_value)
        except (AssertionError, TypeError, ValueError) as e:
            raise ValueError(f"{here}: {value!r} does not fit {fields[key]} ({e})") from None
    return msg


def _qos(transient_local: bool, best_effort: bool = False) -> Any:
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

    reliability = ReliabilityPolicy.BEST_EFFORT if best_effort else ReliabilityPolicy.RELIABLE
    durability = DurabilityPolicy.TRANSIENT_LOCAL if transient_local else DurabilityPolicy.VOLATILE
    return QoSProfile(depth=10, reliability=reliability, durability=durability)


def _spin_until(executor: Any, done: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() >= deadline:
            return False
        executor.spin_once(timeout_sec=0.05)
    return True


def publish(node: Any, executor: Any, args: argparse.Namespace) -> int:
    cls = message_type(args.type)
    msg = fill(cls(), yaml.safe_load(args.values) if args.values.strip() else {})
    publisher = node.create_publisher(cls, args.topic, _qos(transient_local=not args.volatile))
    if args.wait > 0 and not _spin_until(executor, lambda: publisher.get_subscription_count() > 0, args.wait):
        print(f"refinevla-topic: nobody subscribes to {args.topic} yet; publishing anyway"
              + ("" if args.volatile else " (transient local: a subscriber that starts while this runs gets it)"),
              file=sys.stderr)
    for i in range(args.times):
        publisher.publish(msg)
        print(f"published #{i + 1} on {args.topic}: {yaml.safe_dump(to_plain(msg), width=1000).strip()}")
        if i + 1 < args.times:
            _spin_until(executor, lambda: False, 1.0 / args.rate)
    _spin_until(executor, lambda: False, args.linger)  # reliable delivery (and late joiners) while we are still up
    return 0


def echo(node: Any, executor: Any, args: argparse.Namespace) -> int:
    from rclpy.qos import DurabilityPolicy, ReliabilityPolicy

    if not _spin_until(executor, lambda: bool(node.get_publishers_info_by_topic(args.topic)) or bool(args.type),
                       args.timeout):
        print(f"refinevla-topic: no publisher on {args.topic} within {args.timeout:.0f} s; give --type to wait "
              "for one anyway", file=sys.stderr)
        return 1
    infos = node.get_publishers_info_by_topic(args.topic)
    type_name = args.type or infos[0].topic_type
    best_effort = any(i.qos_profile.reliability == ReliabilityPolicy.BEST_EFFORT for i in infos)
    latched = bool(infos) and all(i.qos_profile.durability == DurabilityPolicy.TRANSIENT_LOCAL for i in infos)
    received: list[Any] = []
    node.create_subscription(message_type(type_name), args.topic, received.append,
                             _qos(transient_local=latched, best_effort=best_effort))
    shown = 0
    deadline = time.monotonic() + args.timeout
    while args.count == 0 or shown < args.count:
        if not _spin_until(executor, lambda: bool(received), max(0.0, deadline - time.monotonic())):
            if args.count:
                print(f"refinevla-topic: {shown} of {args.count} message(s) on {args.topic} within "
                      f"{args.timeout:.0f} s", file=sys.stderr)
                return 1
            return 0
        msg = received.pop(0)
        print(yaml.safe_dump(to_plain(msg), sort_keys=False, width=1000).rstrip() + "\n---", flush=True)
        shown += 1
    return 0


def list_topics(node: Any, executor: Any, args: argparse.Namespace) -> int:
    _spin_until(executor, lambda: False, args.timeout)  # discovery takes a moment
    for name, types in sorted(node.get_topic_names_and_types()):
        print(f"{name} [{', '.join(types)}]")
    return 0


EPILOG = """\
examples:
  refinevla-topic pub /refinevla/instruction std_msgs/msg/String "data: push the cube to the target"
  refinevla-topic pub /refinevla/gripper std_msgs/msg/Float64 "data: 1" --volatile --times 5 --rate 5
  refinevla-topic echo /refinevla/rationale --count 3
  refinevla-topic echo /refinevla/episode_status --timeout 120
  refinevla-topic list
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refinevla-topic", description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True, metavar="pub|echo|list")
    pub = sub.add_parser("pub", help="publish a message (once by default)")
    pub.add_argument("topic", help="e.g. /refinevla/instruction")
    pub.add_argument("type", help="message type, e.g. std_msgs/msg/String")
    pub.add_argument("values", nargs="?", default="", help='fields as YAML, e.g. "data: push the cube"')
    pub.add_argument("--times", type=int, default=1, help="how many times to publish (default 1)")
    pub.add_argument("--rate", type=float, default=1.0, help="messages per second when --times > 1 (default 1)")
    pub.add_argument("--wait", type=float, default=10.0, help="seconds to wait for a subscriber first (default 10)")
    pub.add_argument("--linger", type=float, default=1.0, help="seconds to stay up after the last message (default 1)")
    pub.add_argument("--volatile", action="store_true",
                     help="volatile durability (default: transient local, as the project's instruction topic)")
    ech = sub.add_parser("echo", help="print messages as YAML")
    ech.add_argument("topic", help="e.g. /refinevla/rationale")
    ech.add_argument("--type", default="", help="message type (default: the publishers')")
    ech.add_argument("--count", type=int, default=0, help="stop after this many messages (default: until --timeout)")
    ech.add_argument("--timeout", type=float, default=30.0, help="seconds to wait (default 30)")
    lst = sub.add_parser("list", help="topics and their types")
    lst.add_argument("--timeout", type=float, default=2.0, help="seconds of discovery first (default 2)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor

    args = build_parser().parse_args(argv)
    rclpy.init()
    node = rclpy.create_node("refinevla_topic", start_parameter_services=False)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        return {"pub": publish, "echo": echo, "list": list_topics}[args.verb](node, executor, args)
    except ValueError as e:
        print(f"refinevla-topic: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, ExternalShutdownException):  # Ctrl-C, or SIGTERM (rclpy shuts the context down)
        return 0
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    sys.exit(main())
