"""The pip user's path without a system ROS 2: the node launchers (refinevla-policy-node ...) start the real nodes,
and `refinevla-topic pub/echo` publishes an instruction and prints what the node answers, over loopback DDS.

The console scripts call refinevla_ros.launchers.<name>_node(); the processes here call exactly that function (the
scripts exist only after `pip install`; test_packaging checks the wheel declares them)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sensor_msgs.msg import Image

from refinevla_core.config import ConfigError
from refinevla_ros.conversions import rgb_to_image
from refinevla_ros.launchers import NODES, ros_arguments
from refinevla_ros.topic_cli import fill, message_type, to_plain
from test.ros.rosutil import peer_node, spin_until

ROOT = Path(__file__).resolve().parents[2]


def launcher(name: str, log: Path, *args: str) -> subprocess.Popen:
    """What `refinevla-<name>-node ARGS` runs (the console script's body); output to `log`."""
    code = f"import sys; from refinevla_ros.launchers import launch; sys.exit(launch({name!r}))"
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def topic(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "refinevla_ros.topic_cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_launcher_arguments_become_ros_arguments_with_presets_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # presets by name from any folder
    args = ros_arguments(["--params-file", "policy", "--params-file", "policy_sim", "-p", "checkpoint:=runs/a/final"])
    assert args == ["--ros-args", "--params-file", str(ROOT / "config" / "policy.yaml"),
                    "--params-file", str(ROOT / "config" / "policy_sim.yaml"), "-p", "checkpoint:=runs/a/final"]
    assert ros_arguments(["-p", "a:=1", "--ros-args", "-p", "b:=2"]) == ["--ros-args", "-p", "a:=1", "--ros-args",
                                                                         "-p", "b:=2"]
    assert ros_arguments(["--ros-args", "--log-level", "debug"]) == ["--ros-args", "--log-level", "debug"]
    assert ros_arguments([]) == []
    with pytest.raises(ConfigError, match="unknown option --param-file"):
        ros_arguments(["--param-file", "policy"])
    with pytest.raises(ConfigError, match="write key:=value"):
        ros_arguments(["-p", "checkpoint=runs/a"])
    with pytest.raises(ConfigError, match=r"polcy does not exist \(did you mean policy\?\)"):
        ros_arguments(["--params-file", "polcy"])
    assert set(NODES) == {"policy", "sim-bridge", "widowx", "observation-check"}


def test_messages_are_filled_from_yaml_and_printed_short():
    action = fill(message_type("refinevla/msg/Action")(), {"delta": {"x": 1, "yaw": -0.5}, "gripper": 1})
    assert action.delta.x == 1.0 and action.gripper == 1.0
    plain = to_plain(rgb_to_image(np.zeros((4, 8, 3), np.uint8)))
    assert plain["width"] == 8 and plain["data"] == "<96 items>"
    with pytest.raises(ValueError, match=r"has no field 'delta\.q'"):
        fill(message_type("refinevla/Action")(), {"delta": {"q": 1}})
    with pytest.raises(ValueError, match="must look like package/msg/Type"):
        message_type("String")


def test_policy_node_from_its_launcher_answers_an_instruction_published_with_refinevla_topic(tmp_path):
    log = tmp_path / "policy_node.log"
    node_proc = launcher("policy", log, "--params-file", "policy", "-p",
                         "policy_factory:=test.ros.policies:constant_policy", "-p", "control_rate_hz:=10.0")
    try:
        with peer_node("launcher_peer") as (node, ex):
            camera = node.create_publisher(Image, "/camera/image_raw", 10)
            rgb = np.full((24, 32, 3), 90, np.uint8)
            pub = topic("pub", "/refinevla/instruction", "std_msgs/msg/String", "data: push the cube", "--wait", "60")
            assert pub.returncode == 0, pub.stderr
            echo = subprocess.Popen([sys.executable, "-m", "refinevla_ros.topic_cli", "echo", "/refinevla/action",
                                     "--count", "1", "--timeout", "90"], cwd=ROOT, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            spin_until(ex, lambda: echo.poll() is not None, 120, every=lambda: camera.publish(rgb_to_image(rgb)),
                       period=0.1)
            out, err = echo.communicate(timeout=30)
        assert echo.returncode == 0, f"{err}\nnode output:\n{log.read_text()}"
        assert "delta:" in out and "x: 0.05" in out, out  # CONSTANT_ACTION's 0.2 m clipped to policy.yaml's 0.05
        assert "safe_hold: false" in out, out
    finally:
        if node_proc.poll() is None:
            os.killpg(node_proc.pid, signal.SIGTERM)  # what Ctrl-C / a service manager does: a clean stop
        try:
            node_proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(node_proc.pid, signal.SIGKILL)
            node_proc.wait(30)
    assert node_proc.returncode == 0, log.read_text()


def test_a_launcher_help_and_a_bad_argument():
    r = subprocess.run([sys.executable, "-c", "import sys; from refinevla_ros.launchers import launch; "
                        "sys.exit(launch('sim-bridge'))", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "refinevla-sim-bridge-node --params-file sim_bridge" in r.stdout
    r = subprocess.run([sys.executable, "-c", "import sys; from refinevla_ros.launchers import launch; "
                        "sys.exit(launch('policy'))", "--params-file", "nope"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "refinevla-policy-node: config file nope does not exist" in r.stderr
