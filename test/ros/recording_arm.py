"""A test seam for widowx_node: a manipulator class with InterbotixManipulatorXS's API that records what it is told.

widowx_node loads it through its `arm_class` parameter ("test.ros.recording_arm:RecordingManipulator") in place of
interbotix_xs_modules' class, which needs the Interbotix workspace and a robot. It keeps the parts of the real API the
node uses (constructor keywords, `.arm.set_ee_pose_matrix`, `.arm.get_ee_pose`, `.arm.get_joint_commands`,
`.gripper.grasp/.release`) and appends one JSON line per call to $REFINEVLA_TEST_ARM_LOG for the test to read.
Its "IK" succeeds inside a reach radius and fails outside it, like the real solver for unreachable poses.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

START_POSE = np.array([[0.0, 0.0, 1.0, 0.30],  # gripper pointing down (pitch 90°) above the table
                       [0.0, 1.0, 0.0, 0.00],
                       [-1.0, 0.0, 0.0, 0.15],
                       [0.0, 0.0, 0.0, 1.0]])
REACH_M = float(os.environ.get("REFINEVLA_TEST_ARM_REACH", "0.5"))


def _record(**entry) -> None:
    path = os.environ.get("REFINEVLA_TEST_ARM_LOG")
    if path:
        with Path(path).open("a") as f:
            f.write(json.dumps(entry) + "\n")


class RecordingArm:
    def __init__(self) -> None:
        self.T_sb = START_POSE.copy()
        self.joint_commands = [0.0] * 6

    def get_ee_pose(self) -> np.ndarray:
        return self.T_sb.copy()

    def get_joint_commands(self) -> list[float]:
        return list(self.joint_commands)

    # the real signature, positional order included (Interbotix names the pose T_sd)
    def set_ee_pose_matrix(self, T_sd, custom_guess=None, execute=True, moving_time=None,  # noqa: N803, PLR0917
                           accel_time=None, blocking=True):
        pose = np.asarray(T_sd, dtype=np.float64)
        ok = bool(np.linalg.norm(pose[:3, 3]) <= REACH_M)
        theta = [float(v) for v in pose[:3, 3]] + [0.0, 0.0, 0.0]  # stand-in joint values
        _record(call="set_ee_pose_matrix", pose=pose.tolist(), custom_guess=custom_guess, execute=execute,
                blocking=blocking, ok=ok)
        if ok and execute:
            self.T_sb = pose
            self.joint_commands = theta
        return theta, ok


class RecordingGripper:
    def grasp(self, delay: float = 1.0) -> None:
        _record(call="grasp", delay=delay)

    def release(self, delay: float = 1.0) -> None:
        _record(call="release", delay=delay)


class RecordingManipulator:
    def __init__(self, robot_model: str, group_name: str = "arm", gripper_name: str = "gripper",  # noqa: PLR0917
                 robot_name: str | None = None, moving_time: float = 2.0, accel_time: float = 0.3, **kwargs) -> None:
        _record(call="__init__", robot_model=robot_model, group_name=group_name, gripper_name=gripper_name,
                robot_name=robot_name, moving_time=moving_time, accel_time=accel_time)
        self.arm = RecordingArm()
        self.gripper = RecordingGripper()
