"""`refinevla bench record`: does `refinevla record` keep up with a real camera, and how fast does a bag convert?

A publisher in this process sends a rgb8 camera stream (default 640x480 at 30 Hz, ~27 MB/s) plus 5 Hz EE deltas and
gripper over loopback DDS to a `refinevla record` process, for each storage format and camera QoS. Reported as ratios
against the baseline of the same run: messages recorded / messages published (1.0 = nothing lost), the recorder's
CPU time / wall time while recording (startup excluded), and bag read time per format relative to mcap.

    refinevla bench record [--seconds 10] [--width 640 --height 480 --camera-hz 30]
    python -m refinevla_ros.bench_record      # the same, without the `refinevla` command
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from refinevla_core.bench import write_result
from refinevla_core.data.bag_reader import read_bag
from refinevla_core.data.bag_storage import open_bag
from refinevla_ros.harness.processes import NodeProcess

ROOT = Path(__file__).resolve().parents[1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=10.0, help="publishing time per configuration")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--camera-hz", type=float, default=30.0)
    parser.add_argument("--action-hz", type=float, default=5.0)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _publish(args: argparse.Namespace, reliable: bool, recorder: NodeProcess) -> tuple[int, int, float, float]:
    """Camera at --camera-hz and EE delta + gripper at --action-hz for --seconds, once the recorder subscribed to
    them: (images, actions, recorder CPU seconds, wall seconds)."""
    from sensor_msgs.msg import Image
    from std_msgs.msg import Float64, String

    from refinevla.msg import EndEffectorDelta
    from refinevla_ros import topics
    from refinevla_ros.conversions import rgb_to_image
    from refinevla_ros.harness.session import RosSession

    with RosSession("bench_record_publisher") as session:
        node = session.node
        cam = node.create_publisher(Image, topics.IMAGE_TOPIC,
                                    topics.RELIABLE_CAMERA_QOS if reliable else topics.CAMERA_QOS)
        ee = node.create_publisher(EndEffectorDelta, topics.EE_DELTA_TOPIC, topics.COMMAND_QOS)
        grip = node.create_publisher(Float64, topics.GRIPPER_TOPIC, topics.COMMAND_QOS)
        node.create_publisher(String, topics.INSTRUCTION_TOPIC, topics.INSTRUCTION_QOS).publish(
            String(data="pick up the cube"))
        deadline = time.monotonic() + 60
        while not all(p.get_subscription_count() for p in (cam, ee, grip)):
            if time.monotonic() > deadline:
                raise RuntimeError("the recorder never subscribed")
            time.sleep(0.05)
        time.sleep(0.5)
        msg = rgb_to_image(np.random.default_rng(0).integers(0, 255, (args.height, args.width, 3), np.uint8))
        every = max(1, round(args.camera_hz / args.action_hz))
        cpu0, wall0 = _cpu_seconds(recorder.pid), time.monotonic()
        images = actions = 0
        while time.monotonic() - wall0 < args.seconds:
            while time.monotonic() < wall0 + images / args.camera_hz:
                time.sleep(0.0005)
            msg.header.stamp = node.get_clock().now().to_msg()
            cam.publish(msg)
            if images % every == 0:
                ee.publish(EndEffectorDelta(header=msg.header, x=0.01))
                grip.publish(Float64(data=1.0))
                actions += 1
            images += 1
        time.sleep(1.0)  # let the last messages arrive
        return images, actions, _cpu_seconds(recorder.pid) - cpu0, time.monotonic() - wall0


def _one_run(args: argparse.Namespace, storage: str, reliable: bool, work: Path) -> dict[str, Any]:
    from refinevla_ros import topics

    bag = work / f"bag-{storage}-{int(reliable)}"
    command = [sys.executable, "-m", "refinevla_core", "record", "--out", str(bag), "--format", storage]
    with NodeProcess(command, name="refinevla record", cwd=ROOT, stop_timeout_s=60.0) as recorder:
        images, actions, cpu, wall = _publish(args, reliable, recorder)
    with open_bag(bag) as (reader, _):
        counts = {c.topic: c.msgcount for c in reader.connections}
    start = time.perf_counter()
    _, report = read_bag(bag)
    read_s = time.perf_counter() - start
    size_mb = sum(p.stat().st_size for p in bag.iterdir()) / 1e6
    shutil.rmtree(bag)
    return {
        "storage": storage, "camera_qos": "reliable" if reliable else "best effort",
        "images_published": images, "images_recorded_ratio": counts.get(topics.IMAGE_TOPIC, 0) / images,
        "actions_published": actions, "actions_recorded_ratio": counts.get(topics.EE_DELTA_TOPIC, 0) / actions,
        "recorder_cpu_per_wall": cpu / wall, "bag_mb_per_s": size_mb / args.seconds,
        "frames_converted": report.frames, "read_s": read_s,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="refinevla-bench-record-"))
    try:
        table = [_one_run(args, storage, reliable, work)
                 for storage, reliable in (("mcap", True), ("sqlite3", True), ("mcap", False))]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = table[0]["read_s"]
    for row in table:
        row["read_time_vs_mcap"] = row["read_s"] / base
    worst = min(min(r["images_recorded_ratio"], r["actions_recorded_ratio"]) for r in table)
    summary = (
        f"{args.width}x{args.height} rgb8 at {args.camera_hz:g} Hz + {args.action_hz:g} Hz actions for "
        f"{args.seconds:g} s per row, loopback DDS. Worst recorded/published ratio: {worst:.3f} (1.0 = nothing lost). "
        "recorder_cpu_per_wall: the recorder process's CPU seconds per wall second while recording (1.0 = one core). "
        "read_time_vs_mcap: `refinevla convert` bag reading time relative to the reliable mcap row."
    )
    config = {k: getattr(args, k) for k in ("seconds", "width", "height", "camera_hz", "action_hz")}
    return {"summary": summary, "table": table, "config": config}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m refinevla_ros.bench_record")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks"))
    add_arguments(parser)
    args = parser.parse_args(argv)
    out_dir = args.out_dir
    del args.out_dir
    _, md_path = write_result("record", run(args), out_dir)
    print(md_path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
