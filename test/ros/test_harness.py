"""refinevla_ros.harness: the node-process plumbing and the ROS session every evaluation path and benchmark uses.
Real processes and real DDS on loopback; the bridge client itself is exercised against a real sim_bridge_node in
test/sim (test_sim_bridge_node, test_sim_bridge_policy_node)."""

from __future__ import annotations

import os
import sys
import time

import pytest
from std_msgs.msg import String

from refinevla_ros.harness.processes import NodeExitedError, NodeProcess, node_command, private_domain, ros_args
from refinevla_ros.harness.session import RosSession, WaitTimeoutError, pick_free_domain
from refinevla_ros.topics import INSTRUCTION_QOS, INSTRUCTION_TOPIC

IGNORES_SIGINT = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('up', flush=True); " \
                 "time.sleep(120)"


def test_ros_args_keep_what_ros_needs_to_type_a_parameter():
    """A float keeps its decimal point (`5` would declare an integer), booleans are YAML, lists flow style."""
    assert ros_args({"control_rate_hz": 5.0, "dry_run": True, "safety.max_delta": [0.1, 3, 3.2], "device": "cpu",
                     "policy.torch_threads": 1}) == [
        "-p", "control_rate_hz:=5.0", "-p", "dry_run:=true", "-p", "safety.max_delta:=[0.1,3,3.2]",
        "-p", "device:=cpu", "-p", "policy.torch_threads:=1"]
    command = node_command("refinevla_ros.policy_node", {"checkpoint": "c"}, params_files=["a.yaml", "b.yaml"])
    assert command == [sys.executable, "-m", "refinevla_ros.policy_node", "--ros-args", "--params-file", "a.yaml",
                       "--params-file", "b.yaml", "-p", "checkpoint:=c"]


def test_a_process_that_ignores_sigint_is_killed_with_its_group(tmp_path):
    log = tmp_path / "stubborn.log"
    with NodeProcess([sys.executable, "-c", IGNORES_SIGINT], log, name="stubborn", stop_timeout_s=1.0) as proc:
        deadline = time.monotonic() + 30
        while "up" not in proc.output() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.alive() and proc.output().strip() == "up"
        started = time.monotonic()
        code = proc.stop()
    assert code == -9 and time.monotonic() - started < 10
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # nothing of its session is left


def test_a_dead_process_is_reported_with_its_log(tmp_path):
    proc = NodeProcess([sys.executable, "-c", "import sys; print('cannot load the checkpoint'); sys.exit(3)"],
                       tmp_path / "dead.log", name="policy_node")
    proc.proc.wait(30)
    with pytest.raises(NodeExitedError, match=r"policy_node exited \(3\):\ncannot load the checkpoint"):
        proc.check()
    assert proc.stop() == 3


def test_a_session_waits_for_messages_and_names_what_never_came():
    domain = int(os.environ.get("ROS_DOMAIN_ID", "0"))
    with RosSession("harness_talker", domain) as talker, RosSession("harness_listener", domain) as listener:
        heard: list[str] = []
        listener.node.create_subscription(String, INSTRUCTION_TOPIC, lambda m: heard.append(m.data), INSTRUCTION_QOS)
        talker.node.create_publisher(String, INSTRUCTION_TOPIC, INSTRUCTION_QOS).publish(String(data="push it"))
        assert listener.spin_until(lambda: heard, "the instruction", 30) == ["push it"]  # latched: arrives late
        with pytest.raises(WaitTimeoutError, match="timed out after 0 s waiting for a second instruction"):
            listener.spin_until(lambda: len(heard) > 1, "a second instruction", 0.3)


def test_a_session_stops_waiting_when_a_check_fails():
    def check() -> None:
        raise NodeExitedError("sim_bridge_node exited (1)")

    with RosSession("harness_checked", check=check) as session, pytest.raises(NodeExitedError):
        session.wait(lambda: False, 30)


def test_pick_free_domain_skips_a_domain_with_another_node():
    busy = private_domain(150, 200, seed="busy")
    free = busy + 1
    with RosSession("someone_else", busy):
        assert pick_free_domain([busy, free], probe_s=3.0) == free
