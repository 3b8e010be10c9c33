"""sim_bridge_node: the simulator as a ROS 2 robot — camera out, end-effector deltas in — so the policy node, the
evaluator and the regression tests drive a simulated arm exactly as they would drive the WidowX.

Publishes
- /camera/image_raw (sensor_msgs/Image rgb8, sensor-data QoS) and /camera/camera_info (pinhole K of the sim camera);
  header.stamp identifies the observation: an action must carry the stamp of the image it was computed from
- /refinevla/instruction (std_msgs/String, reliable + transient local) at every reset: a new episode
- /refinevla/episode_status (refinevla/msg/EpisodeStatus) after every reset and step
- /refinevla/sim/privileged_state (std_msgs/String, JSON {"stamp": {"sec", "nanosec"}, "episode", "step", "seed",
  "state": {...}}) only with publish_privileged_state: the simulator's ground truth, for scripted experts and tests.
  A camera cannot carry it, and a learned policy must never read it, hence a separate, opt-in debug topic.
Subscribes
- /refinevla/ee_delta (refinevla/msg/EndEffectorDelta) + /refinevla/gripper (std_msgs/Float64, 1 open / 0 closed),
  or the bundled /refinevla/action (refinevla/msg/Action) with action_source:=action
Services
- /refinevla/reset_episode (refinevla/srv/ResetEpisode: task, seed; seed < 0 = next in sequence); the answer's
  message starts with "episode <n>:", the index EpisodeStatus.episode carries from then on
- /refinevla/next_task (std_srvs/Trigger): the next task of `tasks`, next seed

Stepping (parameter step_mode):
- lockstep (default): the sim steps once per action whose header.stamp equals the current image's stamp; actions
  computed from older images are late and ignored. The gripper pairs with the EE delta it follows (publish the
  delta, then the gripper, as policy_node does): the bridge steps when a gripper command arrives after the delta, or
  gripper_grace_s after the delta with the last gripper command (policy_node publishes no gripper on a hold). A
  gripper that came before the delta may belong to an older decision, so it is used only after the grace period.
  action_source:=action takes the bundled, stamped refinevla/Action instead: no pairing needed.
  If no action arrives within action_timeout_s the bridge steps with a hold (no motion, last gripper) and warns: a
  missing or late action holds position. The image is re-sent (same stamp) every republish_s while waiting, in case
  the best-effort camera topic dropped it; policy_node in lock-step takes a re-sent stamp for no new step. At a reset
  the instruction goes out instruction_lead_s before the first image.
- control_rate: a timer steps at control_hz with the newest action not used before whose image stamp is at most
  action_timeout_s old; otherwise a hold step. Real-time behaviour, for running with a live policy.
Non-finite commands are dropped with a warning (never stepped); a done episode ignores actions until a reset.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Any

import numpy as np
from builtin_interfaces.msg import Time as TimeMsg
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Float64, Header, String
from std_srvs.srv import Trigger

from refinevla.msg import Action, EndEffectorDelta, EpisodeStatus
from refinevla.srv import ResetEpisode
from refinevla_core.config import ConfigError
from refinevla_core.sim.backend import SimBackend, SimError, StepResult, make_backend
from refinevla_core.sim.config import SimBridgeConfig
from refinevla_ros.conversions import msg_to_delta, ns_to_time, rgb_to_image, stamp_to_ns
from refinevla_ros.params import DECLARE_OVERRIDES, declare_config
from refinevla_ros.run import BAD_PARAMETERS, run_node
from refinevla_ros.topics import (
    ACTION_TOPIC,
    CAMERA_INFO_TOPIC,
    COMMAND_QOS,
    EE_DELTA_TOPIC,
    GRIPPER_TOPIC,
    IMAGE_TOPIC,
    INSTRUCTION_QOS,
    INSTRUCTION_TOPIC,
    LATCHED_QOS,
    NEXT_TASK_SERVICE,
    PRIVILEGED_STATE_TOPIC,
    RESET_SERVICE,
    STATUS_TOPIC,
)

STATUS_QOS = STATE_QOS = LATCHED_QOS
WATCH_PERIOD_S = 0.05  # lockstep bookkeeping (grace, timeout, re-send); steps themselves happen in callbacks


def camera_info_msg(k: np.ndarray, width: int, height: int, header: Header) -> CameraInfo:
    info = CameraInfo(header=header, width=int(width), height=int(height), distortion_model="plumb_bob")
    info.d = [0.0] * 5
    info.k = [float(v) for v in np.asarray(k, dtype=np.float64).reshape(9)]
    info.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    info.p = [info.k[0], info.k[1], info.k[2], 0.0, info.k[3], info.k[4], info.k[5], 0.0, 0.0, 0.0, 1.0, 0.0]
    return info


class SimBridgeNode(Node):
    def __init__(self, backend_factory: Any = make_backend) -> None:
        super().__init__("sim_bridge", **DECLARE_OVERRIDES)
        self.config: SimBridgeConfig = declare_config(self, SimBridgeConfig)
        self._backend_factory = backend_factory
        cfg = self.config
        self.image_pub = self.create_publisher(Image, IMAGE_TOPIC, qos_profile_sensor_data)
        self.info_pub = self.create_publisher(CameraInfo, CAMERA_INFO_TOPIC, qos_profile_sensor_data)
        self.instruction_pub = self.create_publisher(String, INSTRUCTION_TOPIC, INSTRUCTION_QOS)
        self.status_pub = self.create_publisher(EpisodeStatus, STATUS_TOPIC, STATUS_QOS)
        self.state_pub = (self.create_publisher(String, PRIVILEGED_STATE_TOPIC, STATE_QOS)
                          if cfg.publish_privileged_state else None)
        if cfg.action_source == "ee_delta":
            self.create_subscription(EndEffectorDelta, EE_DELTA_TOPIC, self.on_ee_delta, COMMAND_QOS)
            self.create_subscription(Float64, GRIPPER_TOPIC, self.on_gripper, COMMAND_QOS)
        else:
            self.create_subscription(Action, ACTION_TOPIC, self.on_action, COMMAND_QOS)
        self.create_service(ResetEpisode, RESET_SERVICE, self.on_reset)
        self.create_service(Trigger, NEXT_TASK_SERVICE, self.on_next_task)

        # episode bookkeeping
        self.backend: SimBackend | None = None
        self._intrinsics: np.ndarray | None = None
        self.task_index = 0
        self.next_seed = cfg.first_seed
        self.episode_index = -1
        self.obs_stamp_ns = 0
        self.obs_sent_at = 0.0
        self.last_sent_at = 0.0
        self.image_msg: Image | None = None
        self.info_msg: CameraInfo | None = None
        self.last_status: EpisodeStatus | None = None
        self.gripper_cmd = 1.0  # the last gripper command (Bridge); held across steps and hold steps
        self.gripper_at = 0.0  # when it arrived (monotonic)
        self.pending: tuple[np.ndarray, float, float | None] | None = None  # (delta, arrived at, gripper or None)
        self.counters = {"steps": 0, "hold_steps": 0, "late_actions": 0, "bad_actions": 0, "ignored_done": 0}
        self.step_ms: list[float] = []  # the simulator step alone
        self.publish_ms: list[float] = []  # the step plus building and publishing the observation

        self.reset_episode(cfg.task_cycle[0], cfg.first_seed)
        if cfg.step_mode == "lockstep":
            self.create_timer(WATCH_PERIOD_S, self.on_watch)
        else:
            self.create_timer(1.0 / cfg.control_hz, self.on_control_tick)
        self.get_logger().info(
            f"sim bridge ready: {self.backend.task} ({type(self.backend).__name__}), {cfg.step_mode}, actions from "
            f"{'ee_delta + gripper' if cfg.action_source == 'ee_delta' else ACTION_TOPIC}")

    # ---- episodes ----------------------------------------------------------------------------------------------------
    def reset_episode(self, task: str, seed: int) -> None:
        if self.backend is None or self.backend.task != task:
            if self.backend is not None:
                self.backend.close()
                self.backend = None
            self.backend = self._backend_factory(dataclasses.replace(self.config.sim, task=task))
            self._intrinsics = None
        obs = self.backend.reset(seed)
        self.next_seed = seed + 1
        self.episode_index += 1
        self.pending = None
        self.gripper_cmd, self.gripper_at = 1.0, 0.0
        self.instruction_pub.publish(String(data=obs.instruction))
        if self.config.instruction_lead_s > 0:
            time.sleep(self.config.instruction_lead_s)  # the instruction first: a policy node starts a new episode
        self.publish_observation(obs.image, reward=0.0, success=False)
        self.get_logger().info(f"episode {self.episode_index}: {task} seed {seed}: {obs.instruction!r}")

    def on_reset(self, request: ResetEpisode.Request, response: ResetEpisode.Response) -> ResetEpisode.Response:
        task = request.task.strip() or self.backend.task
        seed = int(request.seed) if request.seed >= 0 else self.next_seed
        try:
            self.reset_episode(task, seed)
        except (SimError, ValueError, ConfigError) as e:
            response.success = False
            response.message = str(e)
            self.get_logger().error(f"reset to {task!r} seed {seed} failed: {e}")
            return response
        response.success, response.message = True, f"episode {self.episode_index}: {task} seed {seed}"
        response.instruction, response.seed = self.backend.instruction, seed
        return response

    def on_next_task(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        tasks = self.config.task_cycle
        self.task_index = (self.task_index + 1) % len(tasks)
        try:
            self.reset_episode(tasks[self.task_index], self.next_seed)
        except (SimError, ValueError, ConfigError) as e:
            response.success, response.message = False, str(e)
            return response
        response.success = True
        response.message = f"{self.backend.task} seed {self.backend.episode.seed}: {self.backend.instruction}"
        return response

    # ---- publishing --------------------------------------------------------------------------------------------------
    def _new_stamp(self) -> TimeMsg:
        ns = self.get_clock().now().nanoseconds
        self.obs_stamp_ns = max(ns, self.obs_stamp_ns + 1)  # strictly increasing: a stamp names one observation
        return ns_to_time(self.obs_stamp_ns)

    def publish_observation(self, image: np.ndarray | None, reward: float, success: bool) -> None:
        be = self.backend
        header = Header(stamp=self._new_stamp(), frame_id=self.config.camera_frame_id)
        if self.state_pub is not None:
            payload = {"stamp": {"sec": header.stamp.sec, "nanosec": header.stamp.nanosec},
                       "episode": self.episode_index, "step": be.episode.steps, "seed": be.episode.seed,
                       "done": be.episode.done, "state": be.privileged_state()}
            self.state_pub.publish(String(data=json.dumps(payload)))
        if image is not None:
            self.image_msg = rgb_to_image(image, header)
            if self._intrinsics is None:
                self._intrinsics = be.camera_intrinsics()  # fixed for a task and image size
            self.info_msg = camera_info_msg(self._intrinsics, image.shape[1], image.shape[0], header)
            self.send_image()
        status = EpisodeStatus(header=header, task=be.task, instruction=be.instruction, seed=int(be.episode.seed),
                               episode=self.episode_index, step=be.episode.steps, max_steps=be.max_steps,
                               reward=float(reward), success=bool(success), ever_success=be.episode.ever_success,
                               done=be.episode.done)
        self.last_status = status
        self.status_pub.publish(status)
        self.obs_sent_at = time.monotonic()

    def send_image(self) -> None:
        if self.image_msg is not None:
            self.info_pub.publish(self.info_msg)
            self.image_pub.publish(self.image_msg)
            self.last_sent_at = time.monotonic()

    # ---- commands in -------------------------------------------------------------------------------------------------
    def _accept(self, stamp: TimeMsg) -> bool:
        """Lockstep: only an action computed from the current image; control_rate: any not-too-old action."""
        if self.backend.episode.done:
            self.counters["ignored_done"] += 1
            return False
        if self.config.step_mode == "lockstep":
            if stamp_to_ns(stamp) != self.obs_stamp_ns:
                self.counters["late_actions"] += 1
                return False
            return True
        age_s = (self.get_clock().now().nanoseconds - stamp_to_ns(stamp)) / 1e9
        if age_s > self.config.action_timeout_s:
            self.counters["late_actions"] += 1
            self.get_logger().warning(f"ignoring an action computed from a {age_s:.2f} s old image (limit "
                                      f"action_timeout_s = {self.config.action_timeout_s})", throttle_duration_sec=5.0)
            return False
        return True

    def _finite(self, values: np.ndarray, what: str) -> bool:
        if np.all(np.isfinite(values)):
            return True
        self.counters["bad_actions"] += 1
        self.get_logger().warning(f"ignoring {what} with non-finite values {values.tolist()}; the simulated arm holds "
                                  "position instead", throttle_duration_sec=5.0)
        return False

    def on_ee_delta(self, msg: EndEffectorDelta) -> None:
        delta = msg_to_delta(msg)
        if not self._finite(delta, "an EE delta") or not self._accept(msg.header.stamp):
            return
        self.pending = (delta, time.monotonic(), None)
        self._try_step()

    def on_gripper(self, msg: Float64) -> None:
        g = float(msg.data)
        if not self._finite(np.array([g]), "a gripper command"):
            return
        if not 0.0 <= g <= 1.0:
            self.get_logger().warning(f"gripper command {g} is outside 0..1 (Bridge: 1 open, 0 closed); clipped",
                                      throttle_duration_sec=5.0)
        self.gripper_cmd, self.gripper_at = float(np.clip(g, 0.0, 1.0)), time.monotonic()
        self._try_step()

    def on_action(self, msg: Action) -> None:
        delta = msg_to_delta(msg.delta)
        values = np.append(delta, msg.gripper)
        if not self._finite(values, "an Action") or not self._accept(msg.header.stamp):
            return
        gripper = None if msg.safe_hold else float(np.clip(msg.gripper, 0.0, 1.0))
        self.pending = (delta, time.monotonic(), gripper)
        if gripper is not None:
            self.gripper_cmd, self.gripper_at = gripper, time.monotonic()
        self._try_step()

    # ---- stepping ----------------------------------------------------------------------------------------------------
    def _try_step(self) -> None:
        """Lockstep: step once the pending delta has its gripper (or the grace period passed)."""
        if self.config.step_mode != "lockstep" or self.pending is None:
            return
        delta, arrived, gripper = self.pending
        # a gripper command belongs to the EE delta it FOLLOWS (policy_node publishes the delta, then the gripper);
        # one that came earlier may be a leftover of a decision on an older image, so it only counts after the grace
        paired = (gripper is not None or self.config.action_source == "action" or self.gripper_at > arrived
                  or time.monotonic() - arrived >= self.config.gripper_grace_s)
        if paired:
            self.pending = None
            self.step(np.append(delta, self.gripper_cmd), hold=False)

    def on_watch(self) -> None:
        """Lockstep timer: finish a delta whose gripper never came, hold on a missing action, re-send the image."""
        if self.backend.episode.done:
            return
        now = time.monotonic()
        if self.pending is not None:
            self._try_step()
            return
        timeout = self.config.action_timeout_s
        if timeout > 0 and now - self.obs_sent_at > timeout:
            self.get_logger().warning(f"no action for the current image within action_timeout_s = {timeout} s: "
                                      "holding position for one step", throttle_duration_sec=5.0)
            self.step(self.backend.hold_action(), hold=True)
        elif self.config.republish_s > 0 and now - self.last_sent_at > self.config.republish_s:
            self.send_image()  # the same stamp: the policy may have missed it on the best-effort topic

    def on_control_tick(self) -> None:
        if self.backend.episode.done:
            return
        if self.pending is None:
            self.step(self.backend.hold_action(), hold=True)
            return
        delta, _, _ = self.pending
        self.pending = None
        self.step(np.append(delta, self.gripper_cmd), hold=False)

    def step(self, action: np.ndarray, hold: bool) -> StepResult | None:
        t0 = time.perf_counter()
        try:
            result = self.backend.step(action)
        except SimError as e:
            self.counters["bad_actions"] += 1
            self.get_logger().error(f"simulator refused the action: {e}")
            return None
        self.step_ms.append((time.perf_counter() - t0) * 1000.0)
        self.counters["steps"] += 1
        self.counters["hold_steps"] += int(hold)
        self.publish_observation(result.obs.image, result.reward, result.success)
        self.publish_ms.append((time.perf_counter() - t0) * 1000.0)
        if result.done:
            be = self.backend
            self.get_logger().info(f"episode {self.episode_index} done after {be.episode.steps} steps: "
                                   f"{'success' if be.episode.ever_success else 'failure'}")
            if self.config.auto_reset:
                self.reset_episode(self.config.task_cycle[self.task_index], self.next_seed)
        return result

    def destroy_node(self) -> None:
        if self.step_ms:
            ms = sorted(self.step_ms)
            self.get_logger().info(f"{self.counters['steps']} steps (median simulator step {ms[len(ms) // 2]:.1f} ms, "
                                   f"publish included {sorted(self.publish_ms)[len(self.publish_ms) // 2]:.1f} ms), "
                                   + ", ".join(f"{k} {v}" for k, v in self.counters.items() if k != "steps"))
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    return run_node(SimBridgeNode, "[sim_bridge]", args=args,
                    fatal=(((SimError, ValueError, *BAD_PARAMETERS), 1, "cannot start"),))


if __name__ == "__main__":
    sys.exit(main())
