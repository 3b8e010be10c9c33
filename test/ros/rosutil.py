"""Helpers for tests that run real nodes in real processes over loopback DDS (no mocked rclpy anywhere)."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node

from refinevla_ros.harness import processes as harness
from refinevla_ros.harness.session import RosSession

ROOT = Path(__file__).resolve().parents[2]


class NodeProcess(harness.NodeProcess):
    """A node started as `python -m <module> --ros-args ...` in its own process; its output goes to a log file."""

    def __init__(self, module: str, ros_args: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        log_path = Path(tempfile.mkstemp(prefix=f"{module.rsplit('.', 1)[-1]}-", suffix=".log")[1])
        cmd = [sys.executable, "-m", module]
        if ros_args:
            cmd += ["--ros-args", *ros_args]
        super().__init__(cmd, log_path, env={**os.environ, **(env or {})}, cwd=ROOT, stop_timeout_s=10.0)

    def stop(self, timeout: float | None = None) -> int:
        if timeout is not None:
            self.stop_timeout_s = timeout
        return super().stop()


@contextlib.contextmanager
def node_process(module: str, ros_args: list[str] | None = None, env: dict[str, str] | None = None
                 ) -> Iterator[NodeProcess]:
    with NodeProcess(module, ros_args, env) as p:
        yield p


@contextlib.contextmanager
def peer_node(name: str = "test_peer") -> Iterator[tuple[Node, SingleThreadedExecutor]]:
    """An rclpy node in the test process, in its own context so tests do not share state."""
    with RosSession(name) as session:
        yield session.node, session.executor


def spin_until(ex: SingleThreadedExecutor, predicate: Callable[[], bool], timeout: float,
               every: Callable[[], None] | None = None, period: float = 0.05) -> bool:
    """Spin until predicate() is true or timeout passes; call every() each period (e.g. to publish)."""
    deadline = time.monotonic() + timeout
    next_call = 0.0
    while time.monotonic() < deadline:
        if every is not None and time.monotonic() >= next_call:
            every()
            next_call = time.monotonic() + period
        ex.spin_once(timeout_sec=0.01)
        if predicate():
            return True
    return predicate()
