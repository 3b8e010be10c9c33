"""Helpers for tests that run real nodes in real processes over loopback DDS (no mocked rclpy anywhere)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import rclpy
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node

ROOT = Path(__file__).resolve().parents[2]


class NodeProcess:
    """A node started as `python -m <module> --ros-args ...` in its own process; its output goes to a log file."""

    def __init__(self, module: str, ros_args: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.log_path = Path(tempfile.mkstemp(prefix=f"{module.rsplit('.', 1)[-1]}-", suffix=".log")[1])
        self._log = self.log_path.open("wb")
        cmd = [sys.executable, "-m", module]
        if ros_args:
            cmd += ["--ros-args", *ros_args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, start_new_session=True)

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


@contextlib.contextmanager
def node_process(module: str, ros_args: list[str] | None = None, env: dict[str, str] | None = None
                 ) -> Iterator[NodeProcess]:
    p = NodeProcess(module, ros_args, env)
    try:
        yield p
    finally:
        p.stop()


@contextlib.contextmanager
def peer_node(name: str = "test_peer") -> Iterator[tuple[Node, SingleThreadedExecutor]]:
    """An rclpy node in the test process, in its own context so tests do not share state."""
    ctx = Context()
    rclpy.init(context=ctx)
    node = rclpy.create_node(name, context=ctx)
    ex = SingleThreadedExecutor(context=ctx)
    ex.add_node(node)
    try:
        yield node, ex
    finally:
        ex.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=ctx)


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
