"""The real-robot data loop over real DDS: publishers in this process, `refinevla record` in its own process, a bag
on disk, `refinevla convert`, and an EpisodeDataset whose frames are exactly what was published. Also: Ctrl-C,
SIGTERM and --duration finish the bag; after kill -9 the flushed part still converts."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Float64, Header, String

from refinevla.msg import Action, EndEffectorDelta
from refinevla_core.data import convert
from refinevla_core.data.bag_storage import open_bag
from refinevla_core.data.episode_dataset import EpisodeDataset
from refinevla_ros.conversions import delta_to_msg, rgb_to_image
from refinevla_ros.observation_check_node import INSTRUCTION_QOS
from test.core.test_ros_free import BLOCK_ROS
from test.ros.rosutil import ROOT, peer_node, spin_until

RELIABLE = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)


@contextlib.contextmanager
def recorder(tmp_path: Path, *args: str) -> Iterator[subprocess.Popen]:
    """`python -m refinevla_core record ...` in its own process (output in tmp_path/record.log)."""
    log = (tmp_path / "record.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "refinevla_core", "record", *args], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


def output(tmp_path: Path) -> str:
    return (tmp_path / "record.log").read_text(errors="replace")


def wait_for_recorder(ex, publishers, tmp_path) -> None:
    assert spin_until(ex, lambda: all(p.get_subscription_count() > 0 for p in publishers), timeout=60), \
        f"the recorder never subscribed; its output:\n{output(tmp_path)}"
    # the latched instruction reaches a new subscription asynchronously; a step published before it arrives is
    # (correctly) skipped as "before_first_instruction", so give it time
    pause(ex, 1.0)


def pause(ex, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        ex.spin_once(timeout_sec=0.01)


def stamp(node) -> Header:
    return Header(stamp=node.get_clock().now().to_msg(), frame_id="camera")


def frame_rgb(k: int) -> np.ndarray:
    return np.random.default_rng(500 + k).integers(0, 256, size=(24, 32, 3), dtype=np.uint8)


def convert_bag(bag: Path, out: Path, *sets: str) -> EpisodeDataset:
    args = ["--bag", str(bag), "--out", str(out), "--no-progress"]
    for s in sets:
        args += ["--set", s]
    parser = __import__("argparse").ArgumentParser()
    convert.add_arguments(parser)
    assert convert.run(parser.parse_args(args)) == 0
    return EpisodeDataset(out)


def test_record_then_convert_gives_exactly_the_published_frames(tmp_path):
    """Teleop layout (image, EE delta, gripper on separate topics), two instructions, stopped with Ctrl-C."""
    bag = tmp_path / "bag"
    published: list[dict] = []
    with peer_node("record_peer") as (node, ex):
        instr = node.create_publisher(String, "/refinevla/instruction", INSTRUCTION_QOS)
        instr.publish(String(data="pick up the red cube"))  # before the recorder exists: latched
        cam = node.create_publisher(Image, "/camera/image_raw", RELIABLE)
        info = node.create_publisher(CameraInfo, "/camera/camera_info", qos_profile_sensor_data)
        ee = node.create_publisher(EndEffectorDelta, "/refinevla/ee_delta", RELIABLE)
        grip = node.create_publisher(Float64, "/refinevla/gripper", RELIABLE)
        with recorder(tmp_path, "--out", str(bag), "--format", "mcap", "--flush-every", "0.2") as proc:
            wait_for_recorder(ex, [instr, cam, info, ee, grip], tmp_path)
            qos = {t: node.get_subscriptions_info_by_topic(t)[0].qos_profile
                   for t in ("/camera/image_raw", "/camera/camera_info", "/refinevla/instruction")}
            assert qos["/camera/image_raw"].reliability == ReliabilityPolicy.RELIABLE
            assert qos["/camera/camera_info"].reliability == ReliabilityPolicy.BEST_EFFORT  # adapts to the publisher
            assert qos["/refinevla/instruction"].durability == DurabilityPolicy.TRANSIENT_LOCAL
            k = 0
            for instruction, steps in (("pick up the red cube", 4), ("put the cube on the towel", 3)):
                if k:
                    instr.publish(String(data=instruction))
                    pause(ex, 0.3)
                for s in range(steps):
                    header = stamp(node)
                    rgb = frame_rgb(k)
                    action = np.array([0.01 * s, -0.01, 0.002 * k, 0.05, -0.05, 0.1 * s, float(s >= 2)])
                    cam.publish(rgb_to_image(rgb, header))
                    info.publish(CameraInfo(header=header, width=32, height=24))
                    pause(ex, 0.05)
                    grip.publish(Float64(data=float(action[6])))
                    ee.publish(delta_to_msg(action, header))  # stamped with its image, as the policy node does
                    pause(ex, 0.25)
                    published.append({"instruction": instruction, "image": rgb, "action": action})
                    k += 1
            pause(ex, 0.5)
            proc.send_signal(signal.SIGINT)  # Ctrl-C
            assert proc.wait(60) == 0, output(tmp_path)
    log = output(tmp_path)
    assert "stopped on SIGINT" in log and "recording /camera/image_raw [sensor_msgs/msg/Image] (reliable)" in log
    assert (bag / "metadata.yaml").is_file() and (bag / "bag.mcap").is_file()
    with open_bag(bag) as (reader, recovered):
        counts = {c.topic: c.msgcount for c in reader.connections}
        assert not recovered
    assert counts["/refinevla/ee_delta"] == 7 and counts["/refinevla/instruction"] == 2
    assert counts["/camera/camera_info"] >= 1

    ds = convert_bag(bag, tmp_path / "ds", "time_source=header", "gripper_slack_s=0.2")
    frames = list(ds.iter_frames())
    assert [f.instruction for f in frames] == [p["instruction"] for p in published]
    assert [e.instruction for e in ds] == ["pick up the red cube", "put the cube on the towel"]
    for frame, pub in zip(frames, published, strict=True):
        np.testing.assert_array_equal(frame.image, pub["image"])
        np.testing.assert_array_equal(frame.action, pub["action"].astype(np.float32))


def test_after_kill_9_the_flushed_recording_still_converts(tmp_path):
    """refinevla/Action messages (gripper included) into sqlite3 storage; the recorder is SIGKILLed."""
    bag = tmp_path / "bag"
    published = []
    with peer_node("kill_peer") as (node, ex):
        instr = node.create_publisher(String, "/refinevla/instruction", INSTRUCTION_QOS)
        instr.publish(String(data="stack the green block on the blue block"))
        cam = node.create_publisher(Image, "/camera/image_raw", RELIABLE)
        act = node.create_publisher(Action, "/refinevla/action", RELIABLE)
        with recorder(tmp_path, "--out", str(bag), "--format", "sqlite3", "--flush-every", "0.2",
                      "--set", "action_topic=/refinevla/action") as proc:
            wait_for_recorder(ex, [instr, cam, act], tmp_path)
            for k in range(5):
                header = stamp(node)
                cam.publish(rgb_to_image(frame_rgb(k), header))
                a = np.array([0.0, 0.01 * k, 0.0, 0.0, 0.02, 0.0, 1.0 - 0.25 * k])
                act.publish(Action(header=header, delta=delta_to_msg(a, header), gripper=float(a[6]), step=k))
                published.append((frame_rgb(k), a))
                pause(ex, 0.1)
            pause(ex, 1.5)  # > several flush periods
            os.killpg(proc.pid, signal.SIGKILL)
            assert proc.wait(30) == -signal.SIGKILL
    assert not (bag / "metadata.yaml").exists(), "kill -9 leaves no metadata.yaml"
    ds = convert_bag(bag, tmp_path / "ds", "action_topic=/refinevla/action", "time_source=header")
    report = ds.meta["converted_from"]["reports"][0]
    assert report["recovered"] and report["frames"] == 5, report
    episode = ds.load_episode(0)
    assert episode.instruction == "stack the green block on the blue block"
    np.testing.assert_array_equal(episode.images, np.stack([rgb for rgb, _ in published]))
    np.testing.assert_array_equal(episode.actions, np.stack([a for _, a in published]).astype(np.float32))


def test_sigterm_finishes_the_bag_with_the_latched_instruction(tmp_path):
    bag = tmp_path / "bag"
    with peer_node("term_peer") as (node, ex):
        instr = node.create_publisher(String, "/refinevla/instruction", INSTRUCTION_QOS)
        instr.publish(String(data="wipe the table"))
        with recorder(tmp_path, "--out", str(bag), "--topics", "/refinevla/instruction") as proc:
            wait_for_recorder(ex, [instr], tmp_path)
            pause(ex, 0.5)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0, output(tmp_path)
    assert "stopped on SIGTERM" in output(tmp_path)
    with open_bag(bag) as (reader, _):
        msgs = [reader.deserialize(raw, c.msgtype).data for c, _, raw in reader.messages()]
    assert msgs == ["wipe the table"]


def test_duration_stops_and_an_empty_recording_says_so(tmp_path):
    with recorder(tmp_path, "--out", str(tmp_path / "bag"), "--duration", "1.5", "--topics", "/nobody/here") as p:
        assert p.wait(60) == 1
    log = output(tmp_path)
    assert "stopped after --duration" in log and "no publisher ever appeared for /nobody/here" in log
    assert (tmp_path / "bag" / "metadata.yaml").is_file()


def test_cli_needs_no_ros_to_start_and_refuses_an_existing_bag(tmp_path):
    code = BLOCK_ROS + "\nimport sys\nfrom refinevla_core.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    r = subprocess.run([sys.executable, "-c", code, "record", "--help"], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--format" in r.stdout and "--duration" in r.stdout
    (tmp_path / "bag").mkdir()
    r = subprocess.run([sys.executable, "-c", code, "record", "--out", str(tmp_path / "bag")], capture_output=True,
                       text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 1 and "choose a new --out" in r.stderr


@pytest.mark.parametrize("msgtype", ["sensor_msgs/msg/Image", "refinevla/msg/Action"])
def test_rosbags_and_rclpy_agree_on_our_types(msgtype, tmp_path):
    """rclpy serializes, rosbags deserializes (what recording does): the values survive."""
    from rclpy.serialization import serialize_message

    from refinevla_core.data.bag_storage import make_typestore

    if msgtype.endswith("Image"):
        msg = rgb_to_image(frame_rgb(1))
    else:
        msg = Action(delta=EndEffectorDelta(x=0.5, yaw=-0.25), gripper=0.75, step=3, safe_hold=True,
                     guard_reason="stale image")
    back = make_typestore().deserialize_cdr(serialize_message(msg), msgtype)
    if msgtype.endswith("Image"):
        assert bytes(back.data) == bytes(msg.data) and back.width == 32
    else:
        assert (back.delta.x, back.delta.yaw, back.gripper, back.step, back.guard_reason) == (
            0.5, -0.25, 0.75, 3, "stale image")
