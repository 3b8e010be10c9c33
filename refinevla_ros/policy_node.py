"""policy_node: runs the ReFineVLA policy on the live camera and publishes guarded end-effector steps + rationales.

The part a user talks to: `ros2 topic pub --once /refinevla/instruction std_msgs/String "data: 'put the spoon on the
towel'"` starts an episode; at `control_rate_hz` (5 Hz as in Bridge) the node runs `predict(latest image,
instruction)` and publishes

- /refinevla/ee_delta (refinevla/msg/EndEffectorDelta): the guarded 6-D step (base axes, see the .msg)
- /refinevla/gripper (std_msgs/Float64): gripper command, Bridge convention 1.0 = open, 0.0 = closed; not published
  on a hold, so the gripper keeps its last command
- /refinevla/rationale (std_msgs/String) and /refinevla/rationale_structured (refinevla/msg/Rationale) when a fresh
  rationale was generated
- /refinevla/action (refinevla/msg/Action): everything above for one step, plus latency, safe_hold and guard_reason
- /refinevla/attention_overlay (sensor_msgs/Image), only with publish_attention and a policy that provides
  `attention_overlay(image)`
- /diagnostics (diagnostic_msgs/DiagnosticArray): latency, holds, overruns, dropped images, lifecycle state.

Safety (refinevla_core.safety): per-axis clipping, optional workspace bounds, NaN/inf -> hold, stale-image watchdog
(no image newer than image_timeout_s -> zero motion, warned once), `~/stop` (std_srvs/Trigger) and `~/enable`
(std_srvs/SetBool). A hold publishes a zero EE delta and an Action with safe_hold=true.

Managed (lifecycle) node: configure loads the policy (`checkpoint` via Policy.from_checkpoint, or `policy_factory`
"package.module:callable" returning any object with predict/reset), activate starts control, deactivate stops it
and publishes a zero step. With autostart (default) it configures and activates itself.

Inference runs on a worker thread, never on the executor: camera callbacks only keep the newest image (latest wins,
no queue), so services and the watchdog stay responsive while a slow model thinks.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.serialization import deserialize_message
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Float64, Header, String
from std_srvs.srv import SetBool, Trigger

from refinevla.msg import Action, EndEffectorDelta
from refinevla.msg import Rationale as RationaleMsg
from refinevla_core.config import ConfigError
from refinevla_core.inference.config import PolicyConfig
from refinevla_core.rationale import Rationale
from refinevla_core.safety import ActionGuard, GuardedStep, SafetyConfig, StaleImageWatchdog
from refinevla_ros.conversions import (
    ImageConversionError,
    compressed_to_rgb,
    decode_text,
    delta_to_msg,
    image_to_rgb,
    rationale_to_msg,
    rgb_to_image,
)
from refinevla_ros.params import declare_config, read_config

# instructions reach late joiners: a `ros2 topic pub --once` sent before the node is up still arrives
INSTRUCTION_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
COMMAND_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)

IMAGE_TOPIC = "/camera/image_raw"
COMPRESSED_IMAGE_TOPIC = IMAGE_TOPIC + "/compressed"  # image_transport's naming
INSTRUCTION_TOPIC = "/refinevla/instruction"
EE_DELTA_TOPIC = "/refinevla/ee_delta"
GRIPPER_TOPIC = "/refinevla/gripper"
RATIONALE_TOPIC = "/refinevla/rationale"
RATIONALE_STRUCTURED_TOPIC = "/refinevla/rationale_structured"
ACTION_TOPIC = "/refinevla/action"
ATTENTION_TOPIC = "/refinevla/attention_overlay"
DIAGNOSTICS_TOPIC = "/diagnostics"
WARN_PERIOD_S = 5.0


@dataclass
class PolicyNodeConfig:
    """Parameters of policy_node (config/policy.yaml). `policy.*` mirrors refinevla_core.inference.policy.PolicyConfig
    and `safety.*` refinevla_core.safety.SafetyConfig."""

    checkpoint: str = ""  # a checkpoint folder for Policy.from_checkpoint
    policy_factory: str = ""  # or "package.module:callable" returning an object with predict/reset
    device: str = "cpu"
    control_rate_hz: float = 5.0  # 0: one step per new image stamp (lock-step with a simulator or a benchmark)
    image_transport: Literal["raw", "compressed"] = "raw"  # compressed: <image topic>/compressed (jpeg/png)
    image_timeout_s: float = 1.0  # stale-image watchdog
    max_instruction_chars: int = 2000
    delta_frame_id: str = "base_link"  # frame whose axes the deltas use (WidowX: wx250s/base_link)
    autostart: bool = True  # configure + activate on start (off: drive it with `ros2 lifecycle set`)
    start_enabled: bool = True  # off: motion stays zero until ~/enable is called with true
    publish_attention: bool = False
    diagnostics_period_s: float = 1.0
    policy: PolicyConfig = field(default_factory=PolicyConfig)  # rationale mode, threads, dtype... (checkpoint only)
    safety: SafetyConfig = field(default_factory=SafetyConfig)

    def __post_init__(self) -> None:
        if self.control_rate_hz < 0:
            raise ValueError(f"control_rate_hz must be >= 0 (0 = a step per new image); got {self.control_rate_hz}")
        if self.image_timeout_s <= 0:
            raise ValueError(f"image_timeout_s must be positive; got {self.image_timeout_s}")
        if self.max_instruction_chars < 1:
            raise ValueError(f"max_instruction_chars must be >= 1; got {self.max_instruction_chars}")
        if self.diagnostics_period_s <= 0:
            raise ValueError(f"diagnostics_period_s must be positive; got {self.diagnostics_period_s}")


class PolicyLoadError(RuntimeError):
    """The policy could not be loaded; the message says which parameter to fix."""


def load_policy(cfg: PolicyNodeConfig) -> Any:
    """The policy named by the config: `policy_factory` ("pkg.module:callable") or `checkpoint` (a folder)."""
    if cfg.policy_factory and cfg.checkpoint:
        raise PolicyLoadError("set only one of the parameters checkpoint and policy_factory")
    if cfg.policy_factory:
        module_name, sep, attr = cfg.policy_factory.partition(":")
        if not sep or not module_name or not attr:
            raise PolicyLoadError(f"policy_factory {cfg.policy_factory!r} must look like 'package.module:callable'")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise PolicyLoadError(f"policy_factory {cfg.policy_factory!r} cannot be imported: {e}") from e
        policy = factory()
    elif cfg.checkpoint:
        path = Path(cfg.checkpoint).expanduser()
        if not path.exists():
            raise PolicyLoadError(f"checkpoint {path} does not exist; pass checkpoint:=<folder written by "
                                  "`refinevla train`>")
        from refinevla_core.inference.policy import Policy  # torch only when a checkpoint is loaded

        policy = Policy.from_checkpoint(path, device=cfg.device, config=cfg.policy)
    else:
        raise PolicyLoadError("no policy: set the parameter checkpoint:=<checkpoint folder> (or policy_factory:="
                              "package.module:callable for your own policy object)")
    missing = [m for m in ("predict", "reset") if not callable(getattr(policy, m, None))]
    if missing:
        raise PolicyLoadError(f"the policy object {type(policy).__name__} has no {' / '.join(missing)} method; "
                              "it needs predict(image, instruction) -> PolicyOutput and reset()")
    return policy


@dataclass
class _Stats:
    images_received: int = 0
    images_used: int = 0
    bad_images: int = 0
    steps: int = 0
    holds: collections.Counter = field(default_factory=collections.Counter)
    overruns: int = 0
    instructions: int = 0
    instructions_rejected: int = 0
    latency_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=100))
    # per model step, ms: image received -> worker has it decoded; predict done -> everything published
    before_predict_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=100))
    after_predict_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=100))
    last_hold_reason: str = ""


class PolicyNode(LifecycleNode):
    def __init__(self, node_name: str = "policy_node", **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        self.config: PolicyNodeConfig = declare_config(self, PolicyNodeConfig)
        self.policy: Any = None
        self.stats = _Stats()
        self._state_label = "unconfigured"
        self._lock = threading.Lock()  # latest image / instruction / episode
        self._publish_lock = threading.Lock()  # "check enabled, then publish" is atomic w.r.t. ~/stop
        self._new_image = threading.Condition(self._lock)
        self._latest_image: Any = None
        self._latest_image_time = 0.0
        self._image_seq = 0
        self._instruction = ""
        self._episode = 0
        self._enabled = self.config.start_enabled
        self._worker: threading.Thread | None = None
        self._stop_worker = threading.Event()
        self._active = False
        self._step_index = 0
        self._rationale_id = 0
        self._last_stamp: tuple[int, int] | None = None  # of the image the last model step used
        self._step_header: Header | None = None  # of the step in progress (for an internal-error hold)
        self._warned: dict[str, float] = {}
        self._pubs: dict[str, Any] = {}
        self._subs: list[Any] = []
        self._watchdog: StaleImageWatchdog | None = None
        self._guard: ActionGuard | None = None
        self._attention = False

        self.create_service(Trigger, "~/stop", self._on_stop)
        self.create_service(SetBool, "~/enable", self._on_enable)
        self._diagnostics_pub = self.create_publisher(DiagnosticArray, DIAGNOSTICS_TOPIC, 10)
        self.create_timer(self.config.diagnostics_period_s, self._publish_diagnostics)

    # ---- lifecycle ---------------------------------------------------------------------------------------------

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self.config = read_config(self, PolicyNodeConfig)  # `ros2 param set` before configure takes effect
            self.policy = load_policy(self.config)
        except (ConfigError, PolicyLoadError) as e:
            self.get_logger().error(f"configure failed: {e}")
            return TransitionCallbackReturn.FAILURE
        except Exception as e:  # a user's factory or checkpoint can fail in any way; report, stay unconfigured
            self.get_logger().error(f"configure failed while loading the policy: {type(e).__name__}: {e}")
            return TransitionCallbackReturn.FAILURE
        cfg = self.config
        self._pubs = {
            "ee_delta": self.create_publisher(EndEffectorDelta, EE_DELTA_TOPIC, COMMAND_QOS),
            "gripper": self.create_publisher(Float64, GRIPPER_TOPIC, COMMAND_QOS),
            "rationale": self.create_publisher(String, RATIONALE_TOPIC, COMMAND_QOS),
            "rationale_structured": self.create_publisher(RationaleMsg, RATIONALE_STRUCTURED_TOPIC, COMMAND_QOS),
            "action": self.create_publisher(Action, ACTION_TOPIC, COMMAND_QOS),
        }
        self._attention = cfg.publish_attention and callable(getattr(self.policy, "attention_overlay", None))
        if cfg.publish_attention and not self._attention:
            self.get_logger().warning(
                f"publish_attention is set but {type(self.policy).__name__} has no attention_overlay(image) "
                f"method; {ATTENTION_TOPIC} will not be published")
        if self._attention:
            self._pubs["attention"] = self.create_publisher(Image, ATTENTION_TOPIC, qos_profile_sensor_data)
        if cfg.image_transport == "compressed":
            image_topic, image_type = COMPRESSED_IMAGE_TOPIC, CompressedImage
        else:
            image_topic, image_type = IMAGE_TOPIC, Image
        self._image_topic = self.resolve_topic_name(image_topic)
        self._image_type = image_type
        self._subs = [
            # raw: only the image a step uses is deserialized (5 of 30 per second), off the executor thread
            self.create_subscription(image_type, image_topic, self._on_image, qos_profile_sensor_data, raw=True),
            self.create_subscription(String, INSTRUCTION_TOPIC, self._on_instruction, INSTRUCTION_QOS),
        ]
        self._watchdog = StaleImageWatchdog(cfg.image_timeout_s)
        self._guard = ActionGuard(cfg.safety)
        self._state_label = "inactive"
        rate = f"{cfg.control_rate_hz:g} Hz" if cfg.control_rate_hz > 0 else "one step per new image"
        self.get_logger().info(f"configured: policy {type(self.policy).__name__}, camera {self._image_topic} "
                               f"({cfg.image_transport}), control {rate}")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._guard.reset_target()
        self._watchdog.start(time.monotonic())
        self._stop_worker.clear()
        self._active = True
        self._state_label = "active"
        self._worker = threading.Thread(target=self._control_loop, name="policy-inference", daemon=True)
        self._worker.start()
        self.get_logger().info("active: control started" + ("" if self._enabled else " (disabled: call ~/enable)"))
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._halt("deactivated")
        self._state_label = "inactive"
        self.get_logger().info("inactive: control stopped, zero motion published")
        return TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        self._state_label = "unconfigured"
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        if self._active:
            self._halt("shutting down")
        self._release()
        self._state_label = "finalized"
        return TransitionCallbackReturn.SUCCESS

    def autostart(self) -> bool:
        """configure + activate, as `ros2 lifecycle set` would; False (with the error logged) when one fails."""
        if self.trigger_configure() != TransitionCallbackReturn.SUCCESS:
            return False
        return self.trigger_activate() == TransitionCallbackReturn.SUCCESS and self._active

    def _halt(self, reason: str) -> None:
        """Stop the control loop; the last thing published is a zero step (a result still in flight is dropped)."""
        with self._publish_lock:
            self._active = False
        self._stop_worker.set()
        with self._new_image:
            self._new_image.notify_all()
        if self._worker is not None:
            self._worker.join(timeout=0.5)  # a slow predict() keeps running; its result is not published
            self._worker = None
        self._publish_step(self._guard.hold(reason) if self._guard else None, header=None, output=None,
                           latency_ms=0.0, force=True)

    def _release(self) -> None:
        for sub in self._subs:
            self.destroy_subscription(sub)
        self._subs = []
        for pub in self._pubs.values():
            self.destroy_publisher(pub)
        self._pubs = {}
        self.policy = None

    # ---- callbacks (executor thread: short, never inference) ---------------------------------------------------

    def _on_image(self, msg: bytes) -> None:
        """The serialized image: kept as bytes until a control step needs it (latest wins)."""
        now = time.monotonic()
        with self._new_image:
            self._latest_image = msg
            self._latest_image_time = now
            self._image_seq += 1
            self.stats.images_received += 1
            self._new_image.notify_all()
        if self._watchdog is not None:
            self._watchdog.image_received(now)

    def _on_instruction(self, msg: String) -> None:
        raw = msg.data
        if "\ufffd" in raw:  # rclpy decodes invalid UTF-8 on the wire as U+FFFD
            self.stats.instructions_rejected += 1
            self.get_logger().warning(
                f"ignoring instruction: it contains bytes that are not valid UTF-8 (shown as U+FFFD); publish "
                f"UTF-8 text. Keeping the current instruction {self._instruction!r}")
            return
        try:
            text = decode_text(raw, self.config.max_instruction_chars)
        except ValueError as e:
            self.stats.instructions_rejected += 1
            self.get_logger().warning(f"ignoring instruction: {e}. Keeping the current instruction "
                                      f"{self._instruction!r}")
            return
        with self._new_image:
            self._instruction = text
            self._episode += 1
            self.stats.instructions += 1
        self.get_logger().info(f"new instruction, episode {self._episode}: {text!r}")

    def _on_stop(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        with self._publish_lock:
            self._enabled = False
        self._publish_step(self._guard.hold("stopped by ~/stop") if self._guard else None, header=None,
                           output=None, latency_ms=0.0, force=True)
        self.get_logger().warning("stopped by ~/stop: motion is zero until ~/enable is called with data: true")
        response.success = True
        response.message = "stopped; call ~/enable with data: true to resume"
        return response

    def _on_enable(self, request: SetBool.Request, response: SetBool.Response) -> SetBool.Response:
        with self._publish_lock:
            self._enabled = bool(request.data)
        if not request.data:
            self._publish_step(self._guard.hold("disabled by ~/enable") if self._guard else None, header=None,
                               output=None, latency_ms=0.0, force=True)
        self.get_logger().info("enabled" if request.data else "disabled: motion is zero")
        response.success = True
        response.message = "enabled" if request.data else "disabled"
        return response

    # ---- control loop (worker thread) ---------------------------------------------------------------------------

    def _control_loop(self) -> None:
        period = 1.0 / self.config.control_rate_hz if self.config.control_rate_hz > 0 else None
        next_tick = time.monotonic()
        processed_seq = -1
        while not self._stop_worker.is_set():
            new_image = True
            if period is not None:
                if self._stop_worker.wait(max(0.0, next_tick - time.monotonic())):
                    break
                next_tick += period
                if next_tick < time.monotonic():  # the last step took longer than a period
                    self.stats.overruns += 1
                    next_tick = time.monotonic() + period
            else:
                with self._new_image:
                    self._new_image.wait_for(
                        lambda seen=processed_seq: self._image_seq != seen or self._stop_worker.is_set(),
                        timeout=self.config.image_timeout_s / 2)
                    new_image = self._image_seq != processed_seq
                    processed_seq = self._image_seq
                if self._stop_worker.is_set():
                    break
            self._step_header = None
            try:
                self._control_step(new_image)
            except Exception as e:  # never let the loop die: a dead loop would leave the last command standing
                self._warn("loop", f"control step failed: {type(e).__name__}: {e}")
                # stamped with the step's image, if known: a lock-step simulator then steps with the hold
                self._publish_step(self._guard.hold(f"internal error: {e}"), self._step_header, None, 0.0)

    def _control_step(self, new_image: bool = True) -> None:
        """One control step; with new_image False (lock-step mode, no image came) only the watchdog runs."""
        with self._lock:
            msg, image_time = self._latest_image, self._latest_image_time
            instruction, episode = self._instruction, self._episode
        guard, watchdog = self._guard, self._watchdog
        if not self._enabled:
            self._publish_step(guard.hold("disabled (call ~/enable with data: true)"), None, None, 0.0)
            return
        status = watchdog.check(time.monotonic())
        if status.stale:
            if status.warn:
                self.get_logger().warning(f"{status.reason} on {self._image_topic}: publishing zero motion until "
                                          "images arrive (check the camera driver and topic remapping)")
            self._publish_step(guard.hold(status.reason), None, None, 0.0)
            return
        if not new_image:
            return
        try:
            msg = deserialize_message(msg, self._image_type)
        except Exception as e:  # a corrupt sample must not take the node down
            self.stats.bad_images += 1
            self._warn("deserialize", f"camera message could not be deserialized, holding still: {e}")
            self._publish_step(guard.hold(f"bad camera message: {e}"), None, None, 0.0)
            return
        stamp = (msg.header.stamp.sec, msg.header.stamp.nanosec)
        if (self.config.control_rate_hz == 0 and stamp == self._last_stamp and stamp != (0, 0)
                and episode == getattr(self, "_policy_episode", None)):
            return  # lock-step: the same image re-sent (a simulator waiting for us) is not a new step
        header = self._step_header = Header(stamp=msg.header.stamp, frame_id=self.config.delta_frame_id)
        if not instruction:
            self._warn("instruction", f"no instruction yet: publish one on {self.resolve_topic_name(INSTRUCTION_TOPIC)}"
                                      " (std_msgs/String); holding still")
            self._publish_step(guard.hold("no instruction"), header, None, 0.0)
            return
        if episode != getattr(self, "_policy_episode", None):
            self.policy.reset()  # a new instruction starts a new episode: rationale cache cleared
            self._policy_episode = episode
            self._step_index = 0
        try:
            rgb = compressed_to_rgb(msg) if isinstance(msg, CompressedImage) else image_to_rgb(msg)
        except ImageConversionError as e:
            self.stats.bad_images += 1
            self._warn(f"image:{str(e)[:40]}", f"bad camera image, holding still: {e}")
            self._publish_step(guard.hold(f"bad camera image: {e}"), header, None, 0.0)
            return
        self.stats.images_used += 1
        self._last_stamp = stamp
        t0 = time.perf_counter()
        self.stats.before_predict_ms.append((time.monotonic() - image_time) * 1000.0)
        try:
            output = self.policy.predict(rgb, instruction)
        except Exception as e:
            self._warn(f"predict:{type(e).__name__}", f"policy.predict failed, holding still: {type(e).__name__}: {e}")
            self._publish_step(guard.hold(f"policy error: {type(e).__name__}: {e}"), header, None, 0.0)
            return
        latency_ms = (time.perf_counter() - t0) * 1000.0
        self.stats.latency_ms.append(latency_ms)
        with self._lock:
            superseded = self._episode != episode
        if superseded:
            return  # computed for the previous instruction: nothing of it is published
        age = time.monotonic() - image_time
        action = getattr(output, "action", None)
        if age > self.config.image_timeout_s:
            step = guard.hold(f"inference took too long: the image was {age:.2f} s old when the action was ready")
        else:
            step = guard.check(action)
        if step.safe_hold:
            self._warn(f"hold:{step.reason[:30]}", f"model output replaced by a hold: {step.reason}")
        elif step.reason:
            self._warn(f"adjust:{step.reason[:20]}", f"model output adjusted: {step.reason}", level="info")
        t1 = time.perf_counter()
        self._publish_step(step, header, output, latency_ms, rgb=rgb)
        self.stats.after_predict_ms.append((time.perf_counter() - t1) * 1000.0)

    # ---- publishing -------------------------------------------------------------------------------------------

    def _publish_step(self, step: GuardedStep | None, header: Header | None, output: Any, latency_ms: float, *,
                      force: bool = False, rgb: np.ndarray | None = None) -> None:
        """Publish one guarded step. Only `force` (stop / deactivate) publishes when disabled or inactive, and then
        only holds; everything else is dropped once ~/stop or deactivate happened."""
        if step is None or not self._pubs:
            return
        with self._publish_lock:
            if not force and (not self._active or (not self._enabled and not step.safe_hold)):
                return
            if force and not step.safe_hold:
                return
            if header is None:
                header = Header(stamp=self.get_clock().now().to_msg(), frame_id=self.config.delta_frame_id)
            rationale_id = self._publish_rationale(output, header) if output is not None else 0
            delta = delta_to_msg(step.delta, header)
            self._pubs["ee_delta"].publish(delta)
            if not step.safe_hold:
                self._pubs["gripper"].publish(Float64(data=float(step.gripper)))
            action = Action(header=header, delta=delta, gripper=float(step.gripper),
                            step=self._step_index, inference_latency_ms=float(latency_ms),
                            rationale_id=rationale_id, safe_hold=step.safe_hold, guard_reason=step.reason)
            self._pubs["action"].publish(action)
            self._step_index += 1
            self.stats.steps += 1
            if step.safe_hold:
                self.stats.holds[step.reason.split(":")[0]] += 1
                self.stats.last_hold_reason = step.reason
        if self._attention and rgb is not None and output is not None:
            self._publish_attention(rgb, header)

    def _publish_rationale(self, output: Any, header: Header) -> int:
        """Publish a fresh rationale (String + refinevla/Rationale); returns the id the step's Action refers to.

        Text that did not parse into four sections (a cut-off generation) is published as is, with the sections the
        output has (a duck-typed object) or empty ones. Never raises: the step's action goes out regardless."""
        try:
            rationale = getattr(output, "rationale", None)
            text = getattr(output, "rationale_text", "") or (rationale.text() if rationale is not None else "")
            if rationale is None and not text:
                return 0
            fresh = bool(getattr(output, "rationale_fresh", True))
            if fresh or self._rationale_id == 0:
                self._rationale_id += 1
                self._pubs["rationale"].publish(String(data=str(text)))
                if isinstance(rationale, Rationale):
                    msg = rationale_to_msg(rationale, header=header, step=self._step_index, rid=self._rationale_id,
                                           fresh=fresh)
                else:
                    msg = RationaleMsg(header=header, text=str(text), step=self._step_index, id=self._rationale_id,
                                       fresh=fresh)
                    for section in ("observation", "situation_analysis", "spatial_reasoning", "task_planning"):
                        value = getattr(rationale, section, "")
                        setattr(msg, section, value if isinstance(value, str) else "")
                self._pubs["rationale_structured"].publish(msg)
        except Exception as e:
            self._warn("rationale", f"the rationale could not be published ({type(e).__name__}: {e}); the action "
                                    "is published without it")
        return self._rationale_id

    def _publish_attention(self, rgb: np.ndarray, header: Header) -> None:
        try:
            overlay = np.asarray(self.policy.attention_overlay(rgb))
            self._pubs["attention"].publish(rgb_to_image(overlay, header))
        except Exception as e:
            self._warn("attention", f"attention overlay failed: {type(e).__name__}: {e}")

    def _warn(self, key: str, message: str, level: str = "warning") -> None:
        """Log once per key per WARN_PERIOD_S (distinct problems are each logged; repeats are throttled)."""
        now = time.monotonic()
        if now - self._warned.get(key, -1e9) < WARN_PERIOD_S:
            return
        self._warned[key] = now
        # rclpy caches severity per call site: one call line per severity
        if level == "info":
            self.get_logger().info(message)
        else:
            self.get_logger().warning(message)

    def _publish_diagnostics(self) -> None:
        s = self.stats
        lat = sorted(s.latency_ms)
        status = DiagnosticStatus(name=f"{self.get_name()}: policy", hardware_id=self.config.device)
        stale = self._watchdog is not None and self._watchdog.status(time.monotonic()).stale
        if self._state_label != "active":
            status.level, status.message = DiagnosticStatus.WARN, f"{self._state_label}: no control"
        elif not self._enabled:
            status.level, status.message = DiagnosticStatus.WARN, "disabled by ~/stop or ~/enable"
        elif stale:
            status.level, status.message = DiagnosticStatus.WARN, "holding still: no recent camera image"
        else:
            status.level, status.message = DiagnosticStatus.OK, "running"
        values = {
            "state": self._state_label, "enabled": self._enabled, "episode": self._episode,
            "instruction": self._instruction[:200], "steps": s.steps, "holds": sum(s.holds.values()),
            "holds_by_reason": dict(s.holds), "last_hold_reason": s.last_hold_reason,
            "images_received": s.images_received, "images_used": s.images_used, "bad_images": s.bad_images,
            "images_dropped": max(0, s.images_received - s.images_used), "overruns": s.overruns,
            "instructions_rejected": s.instructions_rejected,
            "latency_ms_last": s.latency_ms[-1] if lat else "", "latency_ms_p50": lat[len(lat) // 2] if lat else "",
            "latency_ms_max": lat[-1] if lat else "",
            "image_to_predict_ms_p50": _median(s.before_predict_ms), "publish_ms_p50": _median(s.after_predict_ms),
        }
        status.values = [KeyValue(key=k, value=f"{v:.2f}" if isinstance(v, float) else str(v))
                         for k, v in values.items()]
        self._diagnostics_pub.publish(DiagnosticArray(header=Header(stamp=self.get_clock().now().to_msg()),
                                                      status=[status]))


def _median(values: collections.deque) -> float | str:
    return float(np.median(values)) if values else ""


def main(args: list[str] | None = None) -> int:
    # our own SIGINT/SIGTERM handling: the context must still be up to publish the final zero step
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        node = PolicyNode()
    except (ConfigError, InvalidParameterTypeException, InvalidParameterValueException) as e:
        print(f"policy_node: bad parameters: {e} (numbers declared as floats need a decimal point, e.g. 5.0)",
              file=sys.stderr)
        rclpy.try_shutdown()
        return 2
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    if node.config.autostart and not node.autostart():
        node.get_logger().error("autostart failed: the node stays unconfigured; fix the parameters and run "
                                "`ros2 lifecycle set /policy_node configure`")
    try:
        while rclpy.ok():  # wakes every 0.1 s so SIGINT/SIGTERM (KeyboardInterrupt) is handled promptly
            executor.spin_once(timeout_sec=0.1)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        with contextlib.suppress(Exception):
            if node._active:
                node._halt("shutting down")
                for pub in node._pubs.values():
                    pub.wait_for_all_acked(rclpy.duration.Duration(seconds=1.0))
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
