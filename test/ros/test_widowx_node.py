"""widowx_node in its own process, driving a recording stand-in of InterbotixManipulatorXS (test/ros/recording_arm.py).

Real DDS, real node; only the arm is a stand-in (interbotix_xs_modules needs the Interbotix workspace and a robot).
Expected poses are written out by hand from the Bridge convention (translation along base axes, rotation about the
EE point with base axes, composed onto the previous target), not computed with the node's own helper.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from std_msgs.msg import Float64, Header
from std_srvs.srv import SetBool, Trigger

from refinevla.msg import EndEffectorDelta
from test.ros.recording_arm import START_POSE
from test.ros.rosutil import ROOT, node_process, peer_node, spin_until

MODULE = "refinevla_ros.widowx_node"
ARM = "arm_class:=test.ros.recording_arm:RecordingManipulator"


def records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def moves(path: Path) -> list[dict]:
    return [r for r in records(path) if r["call"] == "set_ee_pose_matrix"]


def delta(*, x=0.0, y=0.0, z=0.0, roll=0.0, pitch=0.0, yaw=0.0, frame="wx250s/base_link") -> EndEffectorDelta:
    return EndEffectorDelta(header=Header(frame_id=frame), x=x, y=y, z=z, roll=roll, pitch=pitch, yaw=yaw)


def rz(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _call(ex, client, request):
    assert client.wait_for_service(timeout_sec=30)
    future = client.call_async(request)
    assert spin_until(ex, future.done, 30)
    return future.result()


def test_deltas_and_gripper_drive_the_arm_with_bridge_semantics_and_guards(tmp_path):
    log = tmp_path / "arm.jsonl"
    env = {"REFINEVLA_TEST_ARM_LOG": str(log), "REFINEVLA_TEST_ARM_REACH": "0.40"}
    args = ["-p", ARM, "-p", "dry_run:=false", "-p", "max_command_rate_hz:=1000.0",
            "-p", "safety.workspace_bounds:=true"]
    with peer_node("widowx_peer") as (node, ex), node_process(MODULE, args, env=env) as proc:
        deltas = node.create_publisher(EndEffectorDelta, "/refinevla/ee_delta", 10)
        gripper = node.create_publisher(Float64, "/refinevla/gripper", 10)
        assert spin_until(ex, lambda: deltas.get_subscription_count() and gripper.get_subscription_count()
                          and "ready" in proc.output(), 60), proc.output()
        assert "LIVE" in proc.output()
        init = records(log)[0]
        assert init["call"] == "__init__" and init["robot_model"] == "wx250s" and init["robot_name"] == "wx250s"
        assert init["moving_time"] == 0.2 and init["accel_time"] == 0.1

        def send(msg, n_moves: int | None = None, log_words: str | None = None):
            count = proc.output().count(log_words) if log_words else 0
            deltas.publish(msg)
            if n_moves is not None:
                assert spin_until(ex, lambda: len(moves(log)) >= n_moves, 30), proc.output()
            if log_words:
                assert spin_until(ex, lambda: proc.output().count(log_words) > count, 30), proc.output()

        # translation along base axes onto the target; orientation kept
        send(delta(x=0.01, y=0.02, z=-0.01), n_moves=1)
        first = moves(log)[0]
        pose = np.array(first["pose"])
        np.testing.assert_allclose(pose[:3, 3], [0.31, 0.02, 0.14], atol=1e-12)
        np.testing.assert_allclose(pose[:3, :3], START_POSE[:3, :3], atol=1e-12)
        assert first["execute"] is True and first["blocking"] is False
        assert first["custom_guess"] == [0.0] * 6, "IK seeded with the current joint commands"

        # clipped x (0.2 -> 0.05), yaw about the EE point with base axes: R' = Rz(yaw) @ R, position unaffected
        send(delta(x=0.2, yaw=0.1), n_moves=2, log_words="clipped x")
        second = np.array(moves(log)[1]["pose"])
        np.testing.assert_allclose(second[:3, 3], [0.36, 0.02, 0.14], atol=1e-12)
        np.testing.assert_allclose(second[:3, :3], rz(0.1) @ START_POSE[:3, :3], atol=1e-12)
        np.testing.assert_allclose(moves(log)[1]["custom_guess"][:3], [0.31, 0.02, 0.14], atol=1e-12)

        # refused: non-finite, foreign frame; zero delta = hold (no call); then IK failure leaves the target
        send(delta(x=float("nan")), log_words="non-finite")
        send(delta(x=0.01, frame="camera_link"), log_words="in frame 'camera_link'")
        send(delta())
        send(delta(x=0.05), n_moves=3, log_words="no IK solution")  # |(0.41, 0.02, 0.14)| > 0.40 reach
        assert moves(log)[2]["ok"] is False
        send(delta(x=-0.01), n_moves=4)
        np.testing.assert_allclose(np.array(moves(log)[3]["pose"])[:3, 3], [0.35, 0.02, 0.14], atol=1e-12)

        # workspace box (z >= -0.01): four -0.05 steps from 0.14 end at -0.01, not -0.06
        for i in range(4):
            send(delta(z=-0.05), n_moves=5 + i)
        assert np.array(moves(log)[-1]["pose"])[2, 3] == np.float64(-0.01)
        assert "kept inside the workspace" in proc.output()

        _check_gripper(ex, gripper, log, proc)
        _check_stop_and_enable(node, ex, log, send)
        assert proc.alive()
    out = proc.output()
    assert "Traceback" not in out, out


def _check_gripper(ex, gripper, log, proc):
    """Bridge 1 = open / 0 = closed, acted on only when the state changes; NaN refused; never blocking."""

    def grips():
        return [r["call"] for r in records(log) if r["call"] in ("grasp", "release")]

    for value, expected in ((0.2, ["grasp"]), (0.3, ["grasp"]), (0.9, ["grasp", "release"]),
                            (5.0, ["grasp", "release"]), (0.0, ["grasp", "release", "grasp"])):
        gripper.publish(Float64(data=value))
        if grips() != expected:
            assert spin_until(ex, lambda expected=expected: grips() == expected, 30), (value, grips())
    gripper.publish(Float64(data=float("nan")))
    assert spin_until(ex, lambda: "gripper command nan is not finite" in proc.output(), 30)
    assert all(r["delay"] == 0.0 for r in records(log) if r["call"] in ("grasp", "release")), "non-blocking"


def _check_stop_and_enable(node, ex, log, send):
    """~/stop: commands ignored; ~/enable: resumes and reports the counts so far."""
    stop = node.create_client(Trigger, "/widowx_node/stop")
    enable = node.create_client(SetBool, "/widowx_node/enable")
    assert _call(ex, stop, Trigger.Request()).success
    n = len(moves(log))
    send(delta(y=0.01), log_words="ignoring EE deltas")
    counts = json.loads(_call(ex, enable, SetBool.Request(data=True)).message)
    assert counts["enabled"] and counts["ik_failures"] == 1 and counts["refused"] >= 3
    send(delta(y=0.01), n_moves=n + 1)
    assert len(moves(log)) == n + 1


def test_dry_run_solves_ik_but_moves_nothing_and_rate_limits(tmp_path):
    log = tmp_path / "arm.jsonl"
    args = ["-p", ARM, "-p", "max_command_rate_hz:=0.5"]  # dry_run defaults to true
    with peer_node("dry_peer") as (node, ex), node_process(MODULE, args,
                                                             env={"REFINEVLA_TEST_ARM_LOG": str(log)}) as proc:
        deltas = node.create_publisher(EndEffectorDelta, "/refinevla/ee_delta", 10)
        gripper = node.create_publisher(Float64, "/refinevla/gripper", 10)
        assert spin_until(ex, lambda: deltas.get_subscription_count() and gripper.get_subscription_count()
                          and "ready" in proc.output(), 60), proc.output()
        assert "DRY RUN" in proc.output()
        deltas.publish(delta(x=0.02))
        deltas.publish(delta(x=0.02))  # within 2 s of the first: dropped by the rate limit
        gripper.publish(Float64(data=0.0))
        assert spin_until(ex, lambda: "dry run: would grasp" in proc.output() and "faster than" in proc.output()
                          and moves(log), 30), proc.output()
        assert "dry run: would move to xyz (0.320, 0.000, 0.150)" in proc.output()
        assert proc.alive()
    calls = records(log)
    assert [m["execute"] for m in moves(log)] == [False], "IK checked once, nothing executed"
    assert not [r for r in calls if r["call"] in ("grasp", "release")]


def test_missing_interbotix_fails_clearly_unless_dry_run():
    r = subprocess.run([sys.executable, "-m", MODULE, "--ros-args", "-p", "dry_run:=false"], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "cannot import interbotix_xs_modules" in r.stderr
    assert "dry_run:=true" in r.stderr and "source their workspace" in r.stderr


def test_dry_run_without_interbotix_logs_what_it_would_do():
    with peer_node("noarm_peer") as (node, ex), node_process(MODULE) as proc:
        deltas = node.create_publisher(EndEffectorDelta, "/refinevla/ee_delta", 10)
        assert spin_until(ex, lambda: deltas.get_subscription_count() and "ready" in proc.output(), 60)
        deltas.publish(delta(z=0.03))
        assert spin_until(ex, lambda: "would move to xyz (0.300, 0.000, 0.180)" in proc.output(), 30), \
            proc.output()
        assert "without a robot connection" in proc.output()
