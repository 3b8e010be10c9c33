"""policy_node: runs the ReFineVLA policy on the live camera and publishes guarded end-effector steps + rationales.

`ros2 topic pub --once /refinevla/instruction std_msgs/String "data: 'put the spoon on the towel'"` starts an
episode; at `control_rate_hz` (5 Hz as in Bridge; 0 = one step per new image) the node publishes
/refinevla/ee_delta, /refinevla/gripper (not on a hold), /refinevla/action, /refinevla/rationale(_structured) when a
rationale is written, /refinevla/attention_overlay (publish_attention) and /diagnostics. Topic names and QoS:
refinevla_ros/topics.py.

The rules (episodes, stale / frozen / old-stamped images, holds, clipping, rationale ids, statistics) live in the
ROS-free refinevla_core.inference.runner.PolicyRunner; this node is wiring: lifecycle (configure loads the policy,
activate starts control, deactivate publishes a zero step), `~/stop` (std_srvs/Trigger), `~/enable`
(std_srvs/SetBool), and a worker thread for inference — camera callbacks keep only the newest image (latest wins,
kept serialized until a step needs it), so services and the watchdog stay responsive while a slow model thinks.
"""

from __future__ import annotations

import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.serialization import deserialize_message
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Float64, Header, String
from std_srvs.srv import SetBool, Trigger

from refinevla.msg import Action, EndEffectorDelta
from refinevla.msg import Rationale as RationaleMsg
from refinevla_core.config import ConfigError
from refinevla_core.inference.config import RunnerConfig
from refinevla_core.inference.factory import PolicyLoadError, make_policy
from refinevla_core.inference.runner import LatestFrame, PolicyRunner, StepResult
from refinevla_core.inference.types import AttentionPolicy, ClosablePolicy, LateRationale
from refinevla_ros.conversions import (
    ImageConversionError,
    compressed_to_rgb,
    decode_text,
    delta_to_msg,
    image_to_rgb,
    rationale_to_msg,
    rgb_to_image,
)
from refinevla_ros.params import DECLARE_OVERRIDES, declare_config, read_config
from refinevla_ros.run import run_node
from refinevla_ros.topics import (
    ACTION_TOPIC,
    ATTENTION_TOPIC,
    CAMERA_QOS,
    COMMAND_QOS,
    COMPRESSED_IMAGE_TOPIC,
    DIAGNOSTICS_TOPIC,
    EE_DELTA_TOPIC,
    GRIPPER_TOPIC,
    IMAGE_TOPIC,
    INSTRUCTION_QOS,
    INSTRUCTION_TOPIC,
    RATIONALE_STRUCTURED_TOPIC,
    RATIONALE_TOPIC,
)


@dataclass
class PolicyNodeConfig(RunnerConfig):
    """Parameters of policy_node (config/policy.yaml): RunnerConfig's (policy.* mirrors PolicyConfig, safety.*
    SafetyConfig) plus the ROS-only ones below."""

    image_transport: Literal["raw", "compressed"] = "raw"  # compressed: <image topic>/compressed (jpeg/png)
    delta_frame_id: str = "base_link"  # frame whose axes the deltas use (WidowX: wx250s/base_link)
    autostart: bool = True  # configure + activate on start (off: drive it with `ros2 lifecycle set`)
    start_enabled: bool = True  # off: motion stays zero until ~/enable is called with true
    publish_attention: bool = False
    diagnostics_period_s: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.diagnostics_period_s <= 0:
            raise ValueError(f"diagnostics_period_s must be positive; got {self.diagnostics_period_s}")


def header_stamp_ns(serialized: bytes) -> int:
    """The header stamp of a serialized Image / CompressedImage (CDR: 4-byte encapsulation, then sec, nanosec), read
    without deserializing the pixels; 0 when the bytes are too short."""
    if len(serialized) < 12:
        return 0
    order = "<" if serialized[1] == 1 else ">"
    sec, nanosec = struct.unpack_from(f"{order}iI", serialized, 4)
    return sec * 1_000_000_000 + nanosec


class PolicyNode(LifecycleNode):
    def __init__(self, node_name: str = "policy_node", **kwargs: Any) -> None:
        super().__init__(node_name, **{**DECLARE_OVERRIDES, **kwargs})
        self.config: PolicyNodeConfig = declare_config(self, PolicyNodeConfig)
        self.runner: PolicyRunner | None = None
        self.state_label = "unconfigured"
        self.enabled = self.config.start_enabled
        self.active = False
        self._frames = LatestFrame()  # the newest serialized camera image
        self._publish_lock = threading.Lock()  # "check enabled, then publish" is atomic w.r.t. ~/stop
        self._worker: threading.Thread | None = None
        self._step_stamp_ns: int | None = None  # of the step in progress (for an internal-error hold)
        self._stop_worker = threading.Event()
        self._pubs: dict[str, Any] = {}
        self._subs: list[Any] = []
        self.create_service(Trigger, "~/stop", self._on_stop)
        self.create_service(SetBool, "~/enable", self._on_enable)
        self._diagnostics_pub = self.create_publisher(DiagnosticArray, DIAGNOSTICS_TOPIC, 10)
        self.create_timer(self.config.diagnostics_period_s, self._publish_diagnostics)

    # ---- lifecycle ---------------------------------------------------------------------------------------------

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self.config = cfg = read_config(self, PolicyNodeConfig)  # `ros2 param set` before configure counts
            policy = make_policy(cfg)
        except (ConfigError, PolicyLoadError) as e:
            self.get_logger().error(f"configure failed: {e}")
            return TransitionCallbackReturn.FAILURE
        except Exception as e:  # a user's factory or checkpoint can fail in any way; report, stay unconfigured
            self.get_logger().error(f"configure failed while loading the policy: {type(e).__name__}: {e}")
            return TransitionCallbackReturn.FAILURE
        compressed = cfg.image_transport == "compressed"
        image_topic = COMPRESSED_IMAGE_TOPIC if compressed else IMAGE_TOPIC
        self._image_type = CompressedImage if compressed else Image
        self.runner = PolicyRunner(policy, cfg, self._log, clock_ns=lambda: self.get_clock().now().nanoseconds,
                                   camera=self.resolve_topic_name(image_topic),
                                   instruction_topic=self.resolve_topic_name(INSTRUCTION_TOPIC))
        self._pubs = {name: self.create_publisher(msg_type, topic, COMMAND_QOS) for name, msg_type, topic in (
            ("ee_delta", EndEffectorDelta, EE_DELTA_TOPIC), ("gripper", Float64, GRIPPER_TOPIC),
            ("rationale", String, RATIONALE_TOPIC), ("action", Action, ACTION_TOPIC),
            ("rationale_structured", RationaleMsg, RATIONALE_STRUCTURED_TOPIC))}
        if cfg.publish_attention and not isinstance(policy, AttentionPolicy):
            self.get_logger().warning(f"publish_attention is set but {type(policy).__name__} has no attention_overlay"
                                      f"(image) method; {ATTENTION_TOPIC} will not be published")
        elif cfg.publish_attention:
            self._pubs["attention"] = self.create_publisher(Image, ATTENTION_TOPIC, CAMERA_QOS)
        self._subs = [  # raw: only the image a step uses is deserialized, off the executor thread
            self.create_subscription(self._image_type, image_topic, self._on_image, CAMERA_QOS, raw=True),
            self.create_subscription(String, INSTRUCTION_TOPIC, self._on_instruction, INSTRUCTION_QOS)]
        self.state_label = "inactive"
        rate = f"{cfg.control_rate_hz:g} Hz" if cfg.control_rate_hz > 0 else "one step per new image"
        self.get_logger().info(f"configured: policy {type(policy).__name__} ({cfg.policy.rationale_mode}), camera "
                               f"{self.runner.camera} ({cfg.image_transport}), control {rate}")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.runner.start()
        self._stop_worker.clear()
        self.active, self.state_label = True, "active"
        self._worker = threading.Thread(target=self._control_loop, name="policy-inference", daemon=True)
        self._worker.start()
        self.get_logger().info("active: control started" + ("" if self.enabled else " (disabled: call ~/enable)"))
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.halt("deactivated")
        self.state_label = "inactive"
        self.get_logger().info("inactive: control stopped, zero motion published")
        return TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        self.state_label = "unconfigured"
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.halt("shutting down")
        self._release()
        self.state_label = "finalized"
        return TransitionCallbackReturn.SUCCESS

    def autostart(self) -> None:
        """configure + activate, as `ros2 lifecycle set` would; a failure is logged and the node stays up."""
        if not (self.trigger_configure() == TransitionCallbackReturn.SUCCESS
                and self.trigger_activate() == TransitionCallbackReturn.SUCCESS and self.active):
            self.get_logger().error("autostart failed: the node stays unconfigured; fix the parameters and run "
                                    "`ros2 lifecycle set /policy_node configure`")

    def halt(self, reason: str, wait_s: float = 0.0) -> None:
        """Stop the control loop; the last thing published is a zero step (a result still in flight is dropped).
        wait_s > 0: wait that long for subscribers to acknowledge it (on the way out of the process)."""
        if not self.active:
            return
        with self._publish_lock:
            self.active = False
        self._stop_worker.set()
        self._frames.wake()
        if self._worker is not None:
            self._worker.join(timeout=0.5)  # a slow predict() keeps running; its result is not published
            self._worker = None
        self._publish(self.runner.hold(reason), force=True)
        for pub in self._pubs.values() if wait_s > 0 else ():
            pub.wait_for_all_acked(rclpy.duration.Duration(seconds=wait_s))

    def _release(self) -> None:
        for sub in self._subs:
            self.destroy_subscription(sub)
        for pub in self._pubs.values():
            self.destroy_publisher(pub)
        self._subs, self._pubs = [], {}
        if self.runner is not None and isinstance(self.runner.policy, ClosablePolicy):
            self.runner.policy.close()
        self.runner = None

    # ---- callbacks (executor thread: short, never inference) ---------------------------------------------------

    def _on_image(self, msg: bytes) -> None:
        now = time.monotonic()
        self._frames.put(msg, now)
        if self.runner is not None:
            self.runner.image_arrived(header_stamp_ns(msg), now)

    def _on_instruction(self, msg: String) -> None:
        runner = self.runner
        try:
            if "\ufffd" in msg.data:  # rclpy decodes invalid UTF-8 on the wire as U+FFFD
                raise ValueError("it contains bytes that are not valid UTF-8 (shown as U+FFFD); publish UTF-8 text")
            text = decode_text(msg.data, self.config.max_instruction_chars)
        except ValueError as e:
            runner.stats.instructions_rejected += 1
            self.get_logger().warning(f"ignoring instruction: {e}. Keeping the current instruction "
                                      f"{runner.instruction!r}")
            return
        episode = runner.set_instruction(text)
        self.get_logger().info(f"new instruction, episode {episode}: {text!r}")

    def _on_stop(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        self._disable("stopped by ~/stop")
        self.get_logger().warning("stopped by ~/stop: motion is zero until ~/enable is called with data: true")
        response.success, response.message = True, "stopped; call ~/enable with data: true to resume"
        return response

    def _on_enable(self, request: SetBool.Request, response: SetBool.Response) -> SetBool.Response:
        if request.data:
            with self._publish_lock:
                self.enabled = True
        else:
            self._disable("disabled by ~/enable")
        self.get_logger().info("enabled" if request.data else "disabled: motion is zero")
        response.success, response.message = True, "enabled" if request.data else "disabled"
        return response

    def _disable(self, reason: str) -> None:
        with self._publish_lock:
            self.enabled = False
        if self.runner is not None:
            self._publish(self.runner.hold(reason), force=True)

    # ---- control loop (worker thread) ---------------------------------------------------------------------------

    def _control_loop(self) -> None:
        runner = self.runner
        for msg, received_at, new_image in self._frames.ticks(self.config.control_rate_hz,
                                                              self.config.image_timeout_s / 2, self._stop_worker,
                                                              runner.stats):
            self._step_stamp_ns = None
            try:
                self._control_step(msg, received_at, new_image)
            except Exception as e:  # never let the loop die: a dead loop would leave the last command standing
                runner.warn("loop", f"control step failed: {type(e).__name__}: {e}")
                # stamped with the step's image, if known: a lock-step simulator then steps with the hold
                self._publish(runner.hold(f"internal error: {e}", self._step_stamp_ns))

    def _control_step(self, msg: Any, received_at: float, new_image: bool) -> None:
        """One step; with new_image False (lock-step, no image came) only the watchdog runs."""
        runner = self.runner
        if not self.enabled:
            self._publish(runner.hold("disabled (call ~/enable with data: true)"))
            return
        stale = runner.check_camera()
        if stale is not None or not new_image:
            self._publish(stale)
            return
        try:
            msg = deserialize_message(msg, self._image_type)
        except Exception as e:  # a corrupt sample must not take the node down
            self._publish(runner.bad_image(f"bad camera message: {e}"))
            return
        stamp_ns = self._step_stamp_ns = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        try:
            rgb = compressed_to_rgb(msg) if isinstance(msg, CompressedImage) else image_to_rgb(msg)
        except ImageConversionError as e:
            self._publish(runner.bad_image(f"bad camera image: {e}", stamp_ns))
            return
        result = runner.step(rgb, stamp_ns, received_at)
        t1 = time.perf_counter()
        self._publish(result, rgb=rgb)
        if result is not None and result.output is not None:
            runner.stats.after_predict_ms.append((time.perf_counter() - t1) * 1000.0)

    # ---- publishing -------------------------------------------------------------------------------------------

    def _publish(self, result: StepResult | None, *, force: bool = False, rgb: np.ndarray | None = None) -> None:
        """Publish one step. Only `force` (stop / deactivate) publishes when disabled or inactive, and then only
        holds; everything else is dropped once ~/stop or deactivate happened."""
        if result is None or not self._pubs:
            return
        step = result.step
        with self._publish_lock:
            if (not force and (not self.active or (not self.enabled and not step.safe_hold))) or (
                    force and not step.safe_hold):
                return
            stamp = self.get_clock().now().to_msg() if result.stamp_ns is None else _stamp(result.stamp_ns)
            header = Header(stamp=stamp, frame_id=self.config.delta_frame_id)
            committed = self.runner.commit(result)
            out = result.output
            if committed.publish_rationale:
                self._publish_rationale(out.rationale, out.rationale_text, header, step=committed.step_index,
                                        rid=committed.rationale_id, fresh=out.rationale_fresh)
            delta = delta_to_msg(step.delta, header)
            self._pubs["ee_delta"].publish(delta)
            if not step.safe_hold:
                self._pubs["gripper"].publish(Float64(data=float(step.gripper)))
            self._pubs["action"].publish(Action(
                header=header, delta=delta, gripper=float(step.gripper), step=committed.step_index,
                inference_latency_ms=float(result.latency_ms), rationale_id=committed.rationale_id,
                safe_hold=step.safe_hold, guard_reason=step.reason,
                rationale_age_steps=out.rationale_age_steps if out else -1,
                rationale_age_s=float(out.rationale_age_s) if out else -1.0))
        if committed.pending is not None:  # streaming: the rationale follows its action
            committed.pending.add_done_callback(lambda f, h=header, c=committed: self._publish_late(f, h, c))
        if "attention" in self._pubs and rgb is not None and out is not None:
            self._publish_attention(rgb, header)

    def _publish_late(self, future: Any, header: Header, committed: Any) -> None:
        """Streaming: the rationale of a published action finished; publish it with the id the Action carried."""
        if future.cancelled() or future.exception() is not None or not self.active:
            return
        late: LateRationale = future.result()
        with self._publish_lock:
            if self._pubs:
                self._publish_rationale(late.rationale, late.text, header, step=committed.step_index,
                                        rid=committed.rationale_id, fresh=True)

    def _publish_rationale(self, rationale: Any, text: str, header: Header, *, step: int, rid: int, fresh: bool
                           ) -> None:
        """String + refinevla/Rationale, as generated (text that did not parse keeps its text, sections empty).
        Never raises: the step's action goes out regardless."""
        try:
            msg = rationale_to_msg(rationale, header=header, step=step, rid=rid, fresh=fresh, text=text)
            self._pubs["rationale"].publish(String(data=msg.text))
            self._pubs["rationale_structured"].publish(msg)
        except Exception as e:
            self.runner.warn("rationale", f"the rationale could not be published ({type(e).__name__}: {e}); the "
                                          "action is published without it")

    def _publish_attention(self, rgb: np.ndarray, header: Header) -> None:
        try:
            overlay = np.asarray(self.runner.policy.attention_overlay(rgb))
            self._pubs["attention"].publish(rgb_to_image(overlay, header))
        except Exception as e:
            self.runner.warn("attention", f"attention overlay failed: {type(e).__name__}: {e}")

    def _log(self, level: str, message: str) -> None:
        # rclpy caches severity per call site: one call line per severity
        if level == "info":
            self.get_logger().info(message)
        else:
            self.get_logger().warning(message)

    def _publish_diagnostics(self) -> None:
        runner = self.runner
        status = DiagnosticStatus(name=f"{self.get_name()}: policy", hardware_id=self.config.device)
        if self.state_label != "active":
            status.level, status.message = DiagnosticStatus.WARN, f"{self.state_label}: no control"
        elif not self.enabled:
            status.level, status.message = DiagnosticStatus.WARN, "disabled by ~/stop or ~/enable"
        elif runner.camera_stale():
            status.level, status.message = DiagnosticStatus.WARN, "holding still: no recent camera image"
        else:
            status.level, status.message = DiagnosticStatus.OK, "running"
        values = {"state": self.state_label, "enabled": self.enabled, "rationale_mode":
                  self.config.policy.rationale_mode, **(runner.diagnostics() if runner else {})}
        status.values = [KeyValue(key=k, value=f"{v:.2f}" if isinstance(v, float) else str(v))
                         for k, v in values.items()]
        self._diagnostics_pub.publish(DiagnosticArray(header=Header(stamp=self.get_clock().now().to_msg()),
                                                      status=[status]))


def _stamp(ns: int) -> Any:
    from builtin_interfaces.msg import Time

    return Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


def main(args: list[str] | None = None) -> int:
    def start(node: PolicyNode) -> None:
        if node.config.autostart:
            node.autostart()

    return run_node(PolicyNode, "policy_node", args=args, on_start=start,
                    on_exit=lambda node: node.halt("shutting down", wait_s=1.0))


if __name__ == "__main__":
    sys.exit(main())
