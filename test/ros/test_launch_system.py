"""The launch files run for real with launch_pytest, where a system ROS 2 provides `launch` (not installable from
PyPI) and refinevla is built into it with colcon; skipped otherwise (test_launch_files.py checks them statically).

widowx.launch.py in a dry run with a stand-in policy: images and an instruction in, EE deltas out of policy_node,
and widowx_node updating its target without moving anything (no Interbotix driver needed in a dry run).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

launch_pytest = pytest.importorskip("launch_pytest", reason="needs a system ROS 2 (launch is not on PyPI)")
ament_index = pytest.importorskip("ament_index_python.packages")
try:
    SHARE = ament_index.get_package_share_directory("refinevla")
except (LookupError, ValueError):
    pytest.skip("refinevla is not installed in the sourced ROS 2 workspace (colcon build)", allow_module_level=True)

from launch import LaunchDescription  # noqa: E402
from launch.actions import IncludeLaunchDescription  # noqa: E402
from launch.launch_description_sources import PythonLaunchDescriptionSource  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from std_msgs.msg import String  # noqa: E402
from std_srvs.srv import SetBool  # noqa: E402

from refinevla.msg import EndEffectorDelta  # noqa: E402
from refinevla_ros.conversions import rgb_to_image  # noqa: E402
from refinevla_ros.policy_node import INSTRUCTION_QOS  # noqa: E402
from test.ros.rosutil import ROOT, peer_node, spin_until  # noqa: E402

# the launched policy_node imports the stand-in policy from this checkout
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)


@launch_pytest.fixture
def widowx_dry_run():
    return LaunchDescription([
        IncludeLaunchDescription(
            PythonLaunchDescriptionSource(os.path.join(SHARE, "launch", "widowx.launch.py")),
            launch_arguments={"policy_factory": "test.ros.policies:constant_policy", "dry_run": "true",
                              "control_rate_hz": "10.0"}.items(),
        ),
        launch_pytest.actions.ReadyToTest(),
    ])


@pytest.mark.launch(fixture=widowx_dry_run)
def test_widowx_launch_runs_the_policy_and_a_dry_run_arm():
    deltas = []
    with peer_node("launch_peer") as (node, ex):
        node.create_publisher(String, "/refinevla/instruction", INSTRUCTION_QOS).publish(String(data="wave"))
        camera = node.create_publisher(Image, "/camera/image_raw", 10)
        node.create_subscription(EndEffectorDelta, "/refinevla/ee_delta", deltas.append, 10)
        image = rgb_to_image(np.full((24, 32, 3), 90, dtype=np.uint8))
        assert spin_until(ex, lambda: len([d for d in deltas if d.x != 0.0]) >= 3, 60,
                          every=lambda: camera.publish(image))
        assert all(d.header.frame_id == "wx250s/base_link" for d in deltas)
        enable = node.create_client(SetBool, "/widowx_node/enable")
        assert enable.wait_for_service(timeout_sec=30)
        future = enable.call_async(SetBool.Request(data=True))
        assert spin_until(ex, future.done, 30)
        assert json.loads(future.result().message)["moves"] > 0
