"""sim_bridge_node in control_rate mode (a real-time robot's behaviour): a timer steps the simulator at control_hz;
without a fresh action it holds position, an action computed from a too-old image is ignored, a fresh one is used.

Its own module: the lockstep bridge of test_sim_bridge_node must be gone (module fixture) before this one starts on
the same topics.
"""

from __future__ import annotations

import numpy as np
import pytest
from std_msgs.msg import Header

from refinevla_ros.conversions import delta_to_msg, ns_to_time, stamp_to_ns
from refinevla_ros.harness.bridge import BridgeClient
from refinevla_ros.harness.session import RosSession
from test.ros.rosutil import node_process
from test.sim.conftest import TEST_IMAGE_SIZE

pytestmark = pytest.mark.sim


def test_control_rate_mode_holds_without_actions_and_uses_fresh_ones():
    params = ["-p", "sim.task:=PushCube-v1", "-p", f"sim.image_size:={TEST_IMAGE_SIZE}", "-p",
              "step_mode:=control_rate", "-p", "control_hz:=10.0", "-p", "action_timeout_s:=1.0", "-p",
              "publish_privileged_state:=true"]
    with node_process("refinevla_ros.sim_bridge_node", params) as proc, RosSession("rate_peer") as session:
        client = BridgeClient(session, privileged_state=True, timeout_s=120)
        ready = client.spin_until(lambda: len(client.statuses) >= 4 and client.statuses[-1], "steps without actions")
        # with no policy at all the episode advances at the control rate, holding position
        start = client.spin_until(lambda: client.states.get(stamp_to_ns(client.statuses[0].header.stamp)), "state 0")
        now = client.spin_until(lambda: client.states.get(stamp_to_ns(ready.header.stamp)), "a later state")
        assert ready.step >= 3
        assert np.linalg.norm(np.subtract(now["gripper"]["position"], start["gripper"]["position"])) < 0.005

        stale = Header(stamp=ns_to_time(session.node.get_clock().now().nanoseconds - 5_000_000_000))
        client.delta_pub.publish(delta_to_msg(np.array([0.1, 0, 0, 0, 0, 0]), stale))  # 5 s old: ignored
        # waits for the warning instead of a fixed half second: a loaded machine may take longer to log it
        client.spin_until(lambda: "old image" in proc.output(), "the bridge to ignore the 5 s old action", 30)

        base = len(client.statuses)
        fresh = Header(stamp=session.node.get_clock().now().to_msg())
        client.send(stamp_to_ns(fresh.stamp), np.array([0.1, 0, 0, 0, 0, 0, 1.0]))
        status = client.spin_until(lambda: len(client.statuses) > base + 2 and client.statuses[-1], "more steps")
        moved = client.spin_until(lambda: client.states.get(stamp_to_ns(status.header.stamp)), "the state")
        assert moved["gripper"]["position"][0] - now["gripper"]["position"][0] > 0.01
        assert proc.alive(), proc.output()
