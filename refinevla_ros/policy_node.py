"""policy_node: runs the ReFineVLA policy on the live camera and publishes guarded end-effector steps + rationales.

An instruction on /refinevla/instruction starts an episode; at `control_rate_hz` (0 = one step per new image) the
node publishes the step (refinevla_ros/policy_outputs.py) and /diagnostics. Names and QoS: refinevla_ros/topics.py.

The rules (episodes, stale / frozen / old-stamped images, holds, guards, rationale ids, stats) live in the ROS-free
PolicyRunner; this node is wiring: lifecycle (configure loads the policy, activate starts control, deactivate
publishes a zero step), `~/stop`, `~/enable`, and a worker thread for inference (camera callbacks keep the newest
image only, serialized), so services stay responsive while a model thinks.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

from diagnostic_msgs.msg import DiagnosticArray
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.serialization import deserialize_message
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header, String
from std_srvs.srv import SetBool, Trigger

from refinevla_core.config import ConfigError
from refinevla_core.inference.config import RunnerConfig
from refinevla_core.inference.factory import PolicyLoadError, make_policy
from refinevla_core.inference.runner import Committed, LatestFrame, PolicyRunner, StepResult
from refinevla_core.inference.types import AttentionPolicy, ClosablePolicy
from refinevla_ros import conversions, topics
from refinevla_ros.params import DECLARE_OVERRIDES, declare_config, read_config
from refinevla_ros.policy_outputs import PolicyOutputs, diagnostics_message
from refinevla_ros.run import run_node
from refinevla_ros.topics import COMPRESSED_IMAGE_TOPIC, IMAGE_TOPIC, INSTRUCTION_QOS


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
        self.outputs: PolicyOutputs | None = None
        self._subs: list[Any] = []
        self.create_service(Trigger, "~/stop", self._on_stop)
        self.create_service(SetBool, "~/enable", self._on_enable)
        self._diagnostics_pub = self.create_publisher(DiagnosticArray, topics.DIAGNOSTICS_TOPIC, 10)
        self.create_timer(self.config.diagnostics_period_s, self._publish_diagnostics)

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
        self._to_rgb = conversions.compressed_to_rgb if compressed else conversions.image_to_rgb
        self.runner = PolicyRunner(policy, cfg, self._log, clock_ns=lambda: self.get_clock().now().nanoseconds,
                                   camera=self.resolve_topic_name(image_topic),
                                   instruction_topic=self.resolve_topic_name(topics.INSTRUCTION_TOPIC))
        attention = cfg.publish_attention and isinstance(policy, AttentionPolicy)
        if cfg.publish_attention and not attention:
            self.get_logger().warning(f"publish_attention is set but {type(policy).__name__} has no attention_overlay"
                                      "(image) method; the attention overlay will not be published")
        self.outputs = PolicyOutputs(self, attention)
        self._subs = [  # raw: only the image a step uses is deserialized, off the executor thread
            self.create_subscription(self._image_type, image_topic, self._on_image, topics.CAMERA_QOS, raw=True),
            self.create_subscription(String, topics.INSTRUCTION_TOPIC, self._on_instruction, INSTRUCTION_QOS)]
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
        self._release("unconfigured")
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.halt("shutting down")
        self._release("finalized")
        return TransitionCallbackReturn.SUCCESS

    def autostart(self) -> None:
        """With `autostart`: configure + activate, as `ros2 lifecycle set` would; a failure is logged, the node stays
        up (unconfigured)."""
        if self.config.autostart and not (self.trigger_configure() == TransitionCallbackReturn.SUCCESS
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
        if wait_s > 0:
            self.outputs.wait_for_acks(wait_s)

    def finish(self) -> None:
        """On the way out of the process: a final zero step (acknowledged) and no background rationale work left."""
        self.halt("shutting down", wait_s=1.0)
        self._release("finalized")

    def _release(self, state_label: str) -> None:
        self.state_label = state_label
        for sub in self._subs:
            self.destroy_subscription(sub)
        if self.outputs is not None:
            self.outputs.destroy()
        self._subs, self.outputs = [], None
        if self.runner is not None and isinstance(self.runner.policy, ClosablePolicy):
            self.runner.policy.close()
        self.runner = None

    # callbacks: on the executor thread, short, never inference

    def _on_image(self, msg: bytes) -> None:
        now = time.monotonic()
        self._frames.put(msg, now)
        if self.runner is not None:
            self.runner.image_arrived(conversions.serialized_stamp_ns(msg), now)

    def _on_instruction(self, msg: String) -> None:
        runner = self.runner
        try:
            text = conversions.decode_text(msg.data, self.config.max_instruction_chars)
        except ValueError as e:
            runner.stats.instructions_rejected += 1
            self.get_logger().warning(f"ignoring instruction: {e}. Keeping the current instruction "
                                      f"{runner.instruction!r}")
            return
        episode = runner.set_instruction(text)
        self.get_logger().info(f"new instruction, episode {episode}: {text!r}")

    def _on_stop(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        self._set_enabled(False, "stopped by ~/stop")
        self.get_logger().warning("stopped by ~/stop: motion is zero until ~/enable is called with data: true")
        response.success, response.message = True, "stopped; call ~/enable with data: true to resume"
        return response

    def _on_enable(self, request: SetBool.Request, response: SetBool.Response) -> SetBool.Response:
        self._set_enabled(bool(request.data), "disabled by ~/enable")
        self.get_logger().info("enabled" if request.data else "disabled: motion is zero")
        response.success, response.message = True, "enabled" if request.data else "disabled"
        return response

    def _set_enabled(self, enabled: bool, reason: str) -> None:
        with self._publish_lock:
            self.enabled = enabled
        if not enabled and self.runner is not None:
            self._publish(self.runner.hold(reason), force=True)

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
        stamp_ns = self._step_stamp_ns = conversions.stamp_to_ns(msg.header.stamp)
        try:
            rgb = self._to_rgb(msg)
        except conversions.ImageConversionError as e:
            self._publish(runner.bad_image(f"bad camera image: {e}", stamp_ns))
            return
        result = runner.step(rgb, stamp_ns, received_at)
        t1 = time.perf_counter()
        self._publish(result, rgb=rgb)
        if result is not None and result.output is not None:
            runner.stats.after_predict_ms.append((time.perf_counter() - t1) * 1000.0)

    def _publish(self, result: StepResult | None, *, force: bool = False, rgb: Any = None) -> None:
        """Publish one step; once ~/stop or deactivate happened only `force`d holds (stop, deactivate) go out."""
        if result is None or self.outputs is None:
            return
        hold = result.step.safe_hold
        with self._publish_lock:
            if (force and not hold) or (not force and (not self.active or (not self.enabled and not hold))):
                return
            stamp = (self.get_clock().now().to_msg() if result.stamp_ns is None
                     else conversions.ns_to_time(result.stamp_ns))
            header = Header(stamp=stamp, frame_id=self.config.delta_frame_id)
            committed = self.runner.commit(result)
            problem = self.outputs.step(result, committed, header)
        if problem:
            self.runner.warn("rationale", problem)
        if committed.pending is not None:  # streaming: the rationale follows its action
            committed.pending.add_done_callback(lambda f, h=header, c=committed: self._publish_late(f, h, c))
        if rgb is not None and result.output is not None and (problem := self.outputs.attention(
                self.runner.policy, rgb, header)):
            self.runner.warn("attention", problem)

    def _publish_late(self, future: Any, header: Header, committed: Committed) -> None:
        """Streaming: the rationale of a published action finished; publish it with the id the Action carried."""
        if future.cancelled() or future.exception() is not None or not self.active:
            return
        late = future.result()
        with self._publish_lock:
            problem = self.outputs.rationale(late.rationale, late.text, header, committed, True) if self.outputs else ""
        if problem:
            self.runner.warn("rationale", problem)

    def _log(self, level: str, message: str) -> None:
        if level == "info":  # rclpy fixes the severity of a call site (a line): one line per severity
            self.get_logger().info(message)
        else:
            self.get_logger().warning(message)

    def _publish_diagnostics(self) -> None:
        stale = self.state_label == "active" and self.runner.camera_stale()
        values = {"state": self.state_label, "enabled": self.enabled, "rationale_mode":
                  self.config.policy.rationale_mode, **(self.runner.diagnostics() if self.runner else {})}
        self._diagnostics_pub.publish(diagnostics_message(f"{self.get_name()}: policy", self.config.device, stale,
                                                          values, Header(stamp=self.get_clock().now().to_msg())))


def main(args: list[str] | None = None) -> int:
    return run_node(PolicyNode, "policy_node", args=args, on_start=PolicyNode.autostart, on_exit=PolicyNode.finish)


if __name__ == "__main__":
    sys.exit(main())
