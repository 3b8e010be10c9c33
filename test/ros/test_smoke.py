"""Foundation smoke test: a refinevla_ros node in its own process exchanges real messages with this process.

Image + instruction go out with rclpy over loopback DDS; a refinevla/msg/Rationale comes back describing exactly
what was sent. A bad image in between must not kill the node.
"""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
from sensor_msgs.msg import Image
from std_msgs.msg import String

from refinevla.msg import Rationale as RationaleMsg
from refinevla_ros.conversions import rgb_to_image
from refinevla_ros.observation_check_node import INSTRUCTION_QOS
from test.ros.rosutil import node_process, peer_node, spin_until


def test_network_namespace_holds_only_loopback():
    """./test.sh runs the suite inside `unshare -n`: DDS then cannot leave the machine even if misconfigured."""
    if os.environ.get("REFINEVLA_NETNS") != "1":
        pytest.skip("not started by ./test.sh inside a network namespace")
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout.splitlines()
    names = [line.split(":")[1].strip() for line in links]
    assert names == ["lo"], names


def test_image_and_instruction_in_rationale_out():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, size=(48, 64, 3), dtype=np.uint8)
    replies: list[RationaleMsg] = []
    with peer_node("smoke_peer") as (node, ex):
        # instruction published BEFORE the node exists: transient-local QoS must still deliver it
        instr_pub = node.create_publisher(String, "/refinevla/instruction", INSTRUCTION_QOS)
        instr_pub.publish(String(data="  pick   up the red cube "))
        img_pub = node.create_publisher(Image, "/camera/image_raw", 10)
        node.create_subscription(RationaleMsg, "/refinevla/observation_check", replies.append, 10)

        with node_process("refinevla_ros.observation_check_node") as proc:
            bad = rgb_to_image(rgb)
            bad.encoding = "bgra16"

            def publish_bad_then_good():
                img_pub.publish(bad)
                img_pub.publish(rgb_to_image(rgb))

            got = spin_until(
                ex, lambda: any("pick up the red cube" in r.situation_analysis for r in replies), timeout=60,
                every=publish_bad_then_good, period=0.2,
            )
            assert got, f"no reply with the instruction; node output:\n{proc.output()}"
            assert proc.alive(), proc.output()
            reply = next(r for r in replies if "pick up the red cube" in r.situation_analysis)
            mean = rgb.reshape(-1, 3).mean(0)
            assert "rgb8 image 64x48" in reply.observation
            assert f"({mean[0]:.0f}, {mean[1]:.0f}, {mean[2]:.0f})" in reply.observation
            assert reply.text.startswith("Observation: rgb8 image 64x48")
            assert reply.id > 0
        assert "bgra16" in proc.output() and "not supported" in proc.output()
