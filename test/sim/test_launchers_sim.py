"""README "Without a system ROS 2", run as written: the sim graph from the node launchers (sim bridge + policy node,
the parameters of launch/sim.launch.py), an instruction from `refinevla-topic pub`, episode status and actions from
`refinevla-topic echo`, over loopback DDS. The policy is a stand-in (test/ros/policies.py) instead of a checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = "import sys; from refinevla_ros.launchers import launch; sys.exit(launch(sys.argv.pop(1)))"


def start(log: Path, *args: str) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-c", LAUNCH, *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def topic(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "refinevla_ros.topic_cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=450)


def test_the_sim_graph_from_the_launchers(tmp_path):
    pytest.importorskip("mani_skill", reason="ManiSkill3 is not installed (./setup.sh with WITH_SIM=1)")
    if not os.environ.get("VK_ICD_FILENAMES") and not os.path.exists("/usr/share/vulkan/icd.d"):
        pytest.skip("no Vulkan driver: source .venv/refinevla_env.sh (./setup.sh installs lavapipe)")
    logs = {name: tmp_path / f"{name}.log" for name in ("bridge", "policy")}
    procs = [
        start(logs["bridge"], "sim-bridge", "--params-file", "sim_bridge", "-p", "sim.task:=PushCube-v1",
              "-p", "sim.image_size:=64", "-p", "auto_reset:=true", "-p", "action_timeout_s:=0.0"),
        start(logs["policy"], "policy", "--params-file", "policy", "--params-file", "policy_sim",
              "-p", "policy_factory:=test.ros.policies:constant_policy", "-p", "control_rate_hz:=0.0",
              "-p", "image_timeout_s:=60.0", "-p", "delta_frame_id:=world"),
    ]
    try:
        status = topic("echo", "/refinevla/episode_status", "--count", "1", "--timeout", "400")
        assert status.returncode == 0, status.stderr + logs["bridge"].read_text()
        assert "task: PushCube-v1" in status.stdout and "instruction:" in status.stdout
        assert "Warning" not in logs["bridge"].read_text(), "a normal start prints no library warning"
        pub = topic("pub", "/refinevla/instruction", "std_msgs/msg/String", "data: push the cube to the target")
        assert pub.returncode == 0, pub.stderr
        action = topic("echo", "/refinevla/action", "--count", "2", "--timeout", "120")
        assert action.returncode == 0, action.stderr + logs["policy"].read_text()
        assert "frame_id: world" in action.stdout and "x: 0.1" in action.stdout, action.stdout  # policy_sim's clip
        # the bridge re-sends its task's instruction at every reset; ours reached the policy in between
        assert "new instruction, episode" in logs["policy"].read_text()
        assert "'push the cube to the target'" in logs["policy"].read_text()
        rationale = topic("echo", "/refinevla/rationale", "--count", "1", "--timeout", "120")
        assert "Situation Analysis: instruction" in rationale.stdout, rationale.stdout
    finally:
        codes = [stop(p) for p in procs]
    assert codes == [0, 0], {name: log.read_text()[-2000:] for name, log in logs.items()}


def stop(proc: subprocess.Popen) -> int | None:
    """SIGTERM (a clean stop, exit 0), then SIGKILL if the process is stuck in native code; None if it had to be."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        return None
