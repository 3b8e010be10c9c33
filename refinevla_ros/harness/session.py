"""This process's side of a ROS graph: its own rclpy context (never the global one, so a bench or an evaluation can
run next to other rclpy code in the same process), one node, an executor, and waiting on what arrives; and the
choice of a ROS domain no other node uses.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import rclpy
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor

T = TypeVar("T")
PROBE_S = 1.5


class WaitTimeoutError(TimeoutError):
    """Nothing satisfied the wait in time; the message says what was awaited."""


class RosSession:
    """A context + node + executor on `domain_id` (None: $ROS_DOMAIN_ID). `check()`, when given, runs between spins
    (e.g. the node processes' `check`) so a dead peer is reported at once instead of as a timeout."""

    def __init__(self, node_name: str, domain_id: int | None = None,
                 check: Callable[[], None] | None = None) -> None:
        self.context = Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        try:
            self.node = rclpy.create_node(node_name, context=self.context)
        except BaseException:
            rclpy.shutdown(context=self.context)
            raise
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.check = check or (lambda: None)

    def spin_once(self, timeout_s: float = 0.01) -> None:
        """Handle what has arrived, waiting at most `timeout_s` for something to arrive (no busy loop)."""
        self.executor.spin_once(timeout_sec=timeout_s)

    def wait(self, predicate: Callable[[], T], timeout_s: float, poll_s: float = 0.01) -> T | None:
        """Spin until `predicate()` is truthy (its value) or `timeout_s` passed (None, or the last falsy value)."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            value = predicate()
            if value:
                return value
            self.check()
            self.spin_once(min(poll_s, left))
        return predicate()

    def spin_until(self, predicate: Callable[[], T], what: str, timeout_s: float, poll_s: float = 0.01) -> T:
        """`wait`, but WaitTimeoutError("timed out after N s waiting for <what>") when nothing came."""
        value = self.wait(predicate, timeout_s, poll_s)
        if not value:
            raise WaitTimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        return value

    def spin_for(self, seconds: float) -> None:
        """Handle messages for `seconds` (e.g. to let a new subscription match its publishers)."""
        self.wait(lambda: False, seconds)

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)

    def __enter__(self) -> RosSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pick_free_domain(candidates: list[int], probe_s: float = PROBE_S) -> int | None:
    """The first candidate ROS domain on which no other node shows up within `probe_s`, or None."""
    for domain in candidates:
        with RosSession("refinevla_demo_probe", domain) as probe:
            others = probe.wait(lambda p=probe: [n for n in p.node.get_node_names() if n != "refinevla_demo_probe"],
                                probe_s, poll_s=0.05)
        if not others:
            return domain
    return None
