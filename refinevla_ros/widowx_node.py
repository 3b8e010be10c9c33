"""widowx_node: executes the policy's end-effector steps on an Interbotix WidowX 250 (6DOF), as Bridge data was.

Subscribes /refinevla/ee_delta (refinevla/msg/EndEffectorDelta) and /refinevla/gripper (std_msgs/Float64, Bridge
convention 1.0 = open, 0.0 = closed) and drives the arm through interbotix_xs_modules' InterbotixManipulatorXS
end-effector API, the way bridge_data_robot executed BridgeData V2 actions:

- each delta is clipped per axis (±0.05 m, ±0.25 rad by default) and composed onto the previous TARGET pose, not the
  measured one: translation along base axes, rotation about the end-effector point with base axes
  (refinevla_core.pose.apply_ee_delta); the target's position is kept inside the workspace box;
- the new target goes to `arm.set_ee_pose_matrix(T, custom_guess=<current joint commands>, blocking=False)`
  (non-blocking, 0.2 s moving time as Bridge's 5 Hz steps); no IK solution -> nothing moves, the target stays;
- gripper: below `safety.gripper_threshold` closes (`gripper.grasp`), otherwise opens (`gripper.release`), sent only
  when the state changes;
- NaN/inf, deltas in a foreign frame and commands faster than `max_command_rate_hz` are refused with a warning;
- `dry_run` (default true): IK is solved (`execute=False`) and what would happen is logged; nothing moves.
- `~/stop` (std_srvs/Trigger) ignores commands until `~/enable` (std_srvs/SetBool) is called with true.

interbotix_xs_modules is imported lazily: it is not on PyPI and cannot be installed here. The `arm_class` parameter
("module:Class", default the real InterbotixManipulatorXS) is the test seam: tests pass a class with the same API that
records the commanded poses. The real class path is written against the Interbotix sources but untested here.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rclpy.node import Node
from std_msgs.msg import Float64
from std_srvs.srv import SetBool, Trigger

from refinevla.msg import EndEffectorDelta
from refinevla_core.pose import apply_ee_delta, is_valid_pose, matrix_to_euler, pose_matrix
from refinevla_core.safety import SafetyConfig, clamp_to_workspace, clip_delta, sanitize_gripper
from refinevla_ros.params import DECLARE_OVERRIDES, declare_config
from refinevla_ros.run import DEFAULT_FATAL, run_node
from refinevla_ros.topics import COMMAND_QOS, EE_DELTA_TOPIC, GRIPPER_TOPIC

DEFAULT_ARM_CLASS = "interbotix_xs_modules.xs_robot.arm:InterbotixManipulatorXS"
WARN_PERIOD_S = 5.0


@dataclass
class WidowXNodeConfig:
    """Parameters of widowx_node (config/widowx.yaml); `safety.*` mirrors refinevla_core.safety.SafetyConfig."""

    robot_model: str = "wx250s"
    robot_name: str = ""  # "" = robot_model (the driver's namespace)
    arm_class: str = DEFAULT_ARM_CLASS  # "module:Class" with InterbotixManipulatorXS's API (a test seam)
    dry_run: bool = True  # solve IK and log; never move
    base_frame_id: str = ""  # deltas must be in this frame (or have an empty frame_id); "" = <robot_name>/base_link
    moving_time_s: float = 0.2  # per step, non-blocking (Bridge: 0.2 s steps at 5 Hz)
    accel_time_s: float = 0.1
    max_command_rate_hz: float = 10.0  # deltas arriving faster than this are dropped
    seed_ik_with_joint_commands: bool = True  # IK seeded with the current joint commands (no branch jumps)
    safety: SafetyConfig = field(default_factory=SafetyConfig)

    def __post_init__(self) -> None:
        if ":" not in self.arm_class:
            raise ValueError(f"arm_class must look like 'module:Class'; got {self.arm_class!r}")
        if self.moving_time_s <= 0 or self.accel_time_s < 0 or self.accel_time_s > self.moving_time_s / 2:
            raise ValueError(f"need moving_time_s > 0 and 0 <= accel_time_s <= moving_time_s / 2; got "
                             f"{self.moving_time_s}, {self.accel_time_s}")
        if self.max_command_rate_hz <= 0:
            raise ValueError(f"max_command_rate_hz must be positive; got {self.max_command_rate_hz}")

    @property
    def namespace(self) -> str:
        return self.robot_name or self.robot_model


class ArmUnavailableError(RuntimeError):
    """The arm API cannot be imported or started; the message says what to install or set."""


def import_arm_class(spec: str) -> type:
    module_name, _, class_name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except ImportError as e:
        hint = ("install the Interbotix ROS 2 packages (interbotix_ros_manipulators / interbotix_ros_toolboxes, "
                "https://docs.trossenrobotics.com/interbotix_xsarms_docs) and source their workspace, "
                "or run with dry_run:=true" if spec == DEFAULT_ARM_CLASS else "check the arm_class parameter")
        raise ArmUnavailableError(f"cannot import {spec} ({e}); {hint}") from e
    except AttributeError as e:
        raise ArmUnavailableError(f"{module_name} has no {class_name}; check the arm_class parameter") from e


def start_arm(cfg: WidowXNodeConfig, arm_class: type) -> Any:
    """Construct the manipulator (blocks until the xs_sdk driver answers) and start its ROS executor."""
    kwargs = {"robot_model": cfg.robot_model, "group_name": "arm", "gripper_name": "gripper",
              "robot_name": cfg.namespace, "moving_time": cfg.moving_time_s, "accel_time": cfg.accel_time_s}
    bot = arm_class(**kwargs)
    # releases with `start_on_init` spin themselves; newer ones (ROS 2 Jazzy) need robot_startup()
    if (arm_class.__module__.startswith("interbotix_xs_modules")
            and "start_on_init" not in inspect.signature(arm_class).parameters):
        from interbotix_common_modules.common_robot.robot import robot_startup

        robot_startup()
    return bot


class WidowXNode(Node):
    def __init__(self, node_name: str = "widowx_node", **kwargs: Any) -> None:
        super().__init__(node_name, **{**DECLARE_OVERRIDES, **kwargs})
        self.config: WidowXNodeConfig = declare_config(self, WidowXNodeConfig)
        cfg = self.config
        self.base_frame = cfg.base_frame_id or f"{cfg.namespace}/base_link"
        self.bot: Any = None
        try:
            self.bot = start_arm(cfg, import_arm_class(cfg.arm_class))
        except ArmUnavailableError as e:
            if not cfg.dry_run:
                raise
            self.get_logger().warning(f"{e}. Dry run without a robot connection: IK is not checked and the target "
                                      f"starts at safety.workspace_start {list(cfg.safety.workspace_start)}")
        self.target = self._initial_target()
        self.gripper_open: bool | None = None  # unknown until the first command
        self.enabled = True
        self.last_command_time = -1e9
        # moves: target updates (executed, or only logged in a dry run)
        self.counts = {"moves": 0, "ik_failures": 0, "refused": 0, "dropped_rate": 0}
        self._warned: dict[str, float] = {}
        self.create_subscription(EndEffectorDelta, EE_DELTA_TOPIC, self.on_delta, COMMAND_QOS)
        self.create_subscription(Float64, GRIPPER_TOPIC, self.on_gripper, COMMAND_QOS)
        self.create_service(Trigger, "~/stop", self.on_stop)
        self.create_service(SetBool, "~/enable", self.on_enable)
        mode = "DRY RUN (nothing moves)" if cfg.dry_run else "LIVE: the arm moves"
        self.get_logger().info(f"ready, {mode}; {cfg.robot_model} target {self._describe(self.target)}; deltas in "
                               f"{self.base_frame}")

    def _initial_target(self) -> np.ndarray:
        if self.bot is None:
            return pose_matrix(self.config.safety.workspace_start)
        pose = np.asarray(self.bot.arm.get_ee_pose(), dtype=np.float64)
        if not is_valid_pose(pose):
            raise ArmUnavailableError(f"the arm reported an invalid end-effector pose {pose.tolist()}")
        return pose

    @staticmethod
    def _describe(pose: np.ndarray) -> str:
        x, y, z = pose[:3, 3]
        r, p, yaw = matrix_to_euler(pose[:3, :3])
        return f"xyz ({x:.3f}, {y:.3f}, {z:.3f}) m rpy ({r:.3f}, {p:.3f}, {yaw:.3f}) rad"

    def _warn(self, key: str, message: str) -> None:
        now = time.monotonic()
        if now - self._warned.get(key, -1e9) >= WARN_PERIOD_S:
            self._warned[key] = now
            self.get_logger().warning(message)

    def _refuse(self, key: str, message: str) -> None:
        self.counts["refused"] += 1
        self._warn(key, f"refused command: {message}")

    # ---- commands ---------------------------------------------------------------------------------------------

    def on_delta(self, msg: EndEffectorDelta) -> None:
        cfg = self.config
        if not self.enabled:
            self._warn("disabled", "stopped by ~/stop: ignoring EE deltas until ~/enable is called with true")
            return
        if msg.header.frame_id not in ("", self.base_frame):
            self._refuse("frame", f"EE delta is in frame {msg.header.frame_id!r}, this arm executes deltas in "
                                  f"{self.base_frame!r} (set the policy's delta_frame_id or base_frame_id)")
            return
        delta = np.array([msg.x, msg.y, msg.z, msg.roll, msg.pitch, msg.yaw], dtype=np.float64)
        if not np.all(np.isfinite(delta)):
            self._refuse("finite", f"EE delta has non-finite values {delta.tolist()}")
            return
        if not np.any(delta):
            return  # a hold: the arm stays at its target
        now = time.monotonic()
        if now - self.last_command_time < 1.0 / cfg.max_command_rate_hz:
            self.counts["dropped_rate"] += 1
            self._warn("rate", f"EE deltas arrive faster than max_command_rate_hz={cfg.max_command_rate_hz:g}; "
                               "dropping the extra ones")
            return
        self.last_command_time = now
        delta, clipped = clip_delta(delta, cfg.safety.max_delta)
        if clipped:
            self._warn("clip", f"clipped {', '.join(clipped)} of an EE delta to the per-step limits")
        new_target = apply_ee_delta(self.target, delta)
        if cfg.safety.workspace_bounds:
            new_target[:3, 3], clamped = clamp_to_workspace(new_target[:3, 3], cfg.safety.workspace_min,
                                                            cfg.safety.workspace_max)
            if clamped:
                self._warn("workspace", f"target {', '.join(clamped)} kept inside the workspace box")
        self._move(new_target)

    def _move(self, new_target: np.ndarray) -> None:
        cfg = self.config
        if self.bot is None:  # dry run without a robot connection
            self.get_logger().info(f"dry run: would move to {self._describe(new_target)} (IK not checked)")
            self.target = new_target
            self.counts["moves"] += 1
            return
        seed = None
        if cfg.seed_ik_with_joint_commands and callable(getattr(self.bot.arm, "get_joint_commands", None)):
            seed = list(self.bot.arm.get_joint_commands())
        _, ok = self.bot.arm.set_ee_pose_matrix(new_target, custom_guess=seed, execute=not cfg.dry_run,
                                                blocking=False)
        if not ok:
            self.counts["ik_failures"] += 1
            self._warn("ik", f"no IK solution for {self._describe(new_target)}: not moving, target unchanged")
            return
        self.target = new_target
        self.counts["moves"] += 1
        if cfg.dry_run:
            self.get_logger().info(f"dry run: would move to {self._describe(new_target)} (IK ok)")

    def on_gripper(self, msg: Float64) -> None:
        if not self.enabled:
            return
        cfg = self.config.safety
        if not np.isfinite(msg.data):
            self._refuse("gripper", f"gripper command {msg.data} is not finite")
            return
        value, note = sanitize_gripper(msg.data, previous=1.0, binarize=True, threshold=cfg.gripper_threshold)
        if note:
            self._warn("gripper-range", note)
        want_open = value >= 0.5
        if want_open == self.gripper_open:
            return
        self.gripper_open = want_open
        verb = "release (open)" if want_open else "grasp (close)"
        if self.config.dry_run or self.bot is None:
            self.get_logger().info(f"dry run: would {verb} the gripper (command {msg.data:g})")
            return
        if want_open:
            self.bot.gripper.release(delay=0.0)
        else:
            self.bot.gripper.grasp(delay=0.0)

    def on_stop(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        self.enabled = False
        self.get_logger().warning("stopped by ~/stop: the arm holds its last target; ~/enable resumes")
        response.success, response.message = True, "stopped; call ~/enable with data: true to resume"
        return response

    def shut_down(self) -> None:
        """On the way out: no further command is executed; the arm holds its last target."""
        self.enabled = False
        self.get_logger().info("shutting down: the arm holds its last target; " + ", ".join(
            f"{k} {v}" for k, v in self.counts.items()))

    def on_enable(self, request: SetBool.Request, response: SetBool.Response) -> SetBool.Response:
        self.enabled = bool(request.data)
        if self.enabled and self.bot is not None:
            self.target = self._initial_target()  # resume from where the arm actually is
        self.get_logger().info("enabled" if self.enabled else "disabled")
        response.success, response.message = True, json.dumps({"enabled": self.enabled, **self.counts})
        return response


def main(args: list[str] | None = None) -> int:
    return run_node(WidowXNode, "widowx_node", args=args, fatal=(*DEFAULT_FATAL, ((ArmUnavailableError,), 1, "")),
                    on_exit=WidowXNode.shut_down)


if __name__ == "__main__":
    sys.exit(main())
