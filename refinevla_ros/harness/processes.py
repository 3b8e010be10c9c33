"""Node processes for evaluation, benchmarks and the demo: the command line (`-p key:=value` encoding, params
files), the process itself (own session, output to a log), its shutdown (SIGINT, wait, then kill the group), and
the environment of a graph that must never reach a robot (a private ROS domain, loopback-only DDS). No rclpy here.

Why its own session: a node that hangs on shutdown, or a child it started, is killed as a group without touching
the caller; SIGINT first so nodes that command motion publish their final zero step (refinevla_ros.run).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO


class NodeExitedError(RuntimeError):
    """A node process ended while it was needed; the message carries the end of its log."""


def ros_args(params: Mapping[str, Any]) -> list[str]:
    """`-p name:=value` arguments: booleans in YAML spelling, floats keep their decimal point (ROS types a
    parameter from its text: `5` would be an integer), lists in YAML flow style."""
    out: list[str] = []
    for key, value in params.items():
        if isinstance(value, bool):
            text = str(value).lower()
        elif isinstance(value, (list, tuple)):
            text = "[" + ",".join(repr(float(v)) if isinstance(v, float) else str(v) for v in value) + "]"
        else:
            text = repr(value) if isinstance(value, float) else str(value)
        out += ["-p", f"{key}:={text}"]
    return out


def node_command(module: str, params: Mapping[str, Any] | None = None,
                 params_files: Sequence[str | Path] = ()) -> list[str]:
    """`python -m <module> --ros-args [--params-file F ...] [-p k:=v ...]` with this interpreter (later wins)."""
    ros: list[str] = []
    for path in params_files:
        ros += ["--params-file", str(path)]
    ros += ros_args(params or {})
    return [sys.executable, "-m", module, "--ros-args", *ros]


class NodeProcess:
    """A command in its own process and session, stdout and stderr to `log_path` (or discarded). `stop()` sends
    SIGINT, waits `stop_timeout_s`, then kills the process group. Also a context manager that stops on exit."""

    def __init__(self, command: Sequence[str], log_path: Path | None = None, *, name: str = "",
                 env: Mapping[str, str] | None = None, cwd: Path | None = None, stop_timeout_s: float = 15.0) -> None:
        self.name = name or (command[2] if len(command) > 2 and command[1] == "-m" else str(command[0]))
        self.log_path = log_path
        self.stop_timeout_s = stop_timeout_s
        self._log: BinaryIO | None = None
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = log_path.open("wb")
        self.proc = subprocess.Popen(list(command), stdout=self._log or subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=None if env is None else dict(env), cwd=cwd)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        """Everything the process wrote so far ("" without a log)."""
        if self._log is None or self.log_path is None:
            return ""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def log_tail(self, chars: int = 2500) -> str:
        return self.output()[-chars:]

    def check(self) -> None:
        """NodeExitedError (with the end of the log) when the process has ended."""
        if not self.alive():
            raise NodeExitedError(f"{self.name} exited ({self.proc.returncode}):\n{self.log_tail()}")

    def stop(self) -> int | None:
        """SIGINT, wait, kill the group if it does not end; closes the log. Returns the exit code."""
        if self.alive():
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self._log is not None and not self._log.closed:
            self._log.close()
        return self.proc.returncode

    def __enter__(self) -> NodeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def private_domain(low: int = 150, high: int = 230, seed: Any = None) -> int:
    """A ROS domain id in [low, high] drawn from `seed` (default: this process id), for a graph of test publishers
    that must not land on a robot's domain (0 and the low ids most setups use)."""
    return random.Random(os.getpid() if seed is None else seed).randint(low, high)


def use_loopback_profile(env: dict[str, str] | None = None) -> None:
    """Restrict DDS to this machine (the loopback-only profile `./setup.sh` installs, named by
    $REFINEVLA_FASTDDS_LOOPBACK) in this process and in `env`, unless a profile is already chosen."""
    profile = os.environ.get("REFINEVLA_FASTDDS_LOOPBACK")
    if profile and "FASTRTPS_DEFAULT_PROFILES_FILE" not in os.environ:
        os.environ["FASTRTPS_DEFAULT_PROFILES_FILE"] = profile
        if env is not None:
            env["FASTRTPS_DEFAULT_PROFILES_FILE"] = profile
