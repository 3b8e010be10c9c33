"""Evaluation through ROS: drive a running sim_bridge_node over real topics with any predict/reset policy.

The client is what a policy node is to the bridge — it receives the camera image (and, for the scripted expert only,
the privileged-state debug topic), calls `policy.predict`, and publishes the EE delta stamped with the image's stamp
then the gripper command — plus what an evaluator needs: it resets episodes through the ResetEpisode service and reads
the outcome from EpisodeStatus. It returns the same EpisodeResult as the in-process runner
(refinevla_core.eval.runner), so both paths are compared number for number.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image
from std_msgs.msg import Float64, Header, String

from refinevla.msg import Action, EndEffectorDelta, EpisodeStatus
from refinevla.msg import Rationale as RationaleMsg
from refinevla.srv import ResetEpisode
from refinevla_core.eval.runner import EpisodeResult, _caption
from refinevla_core.sim.config import SimConfig
from refinevla_ros.conversions import delta_to_msg, image_to_rgb, msg_to_delta
from refinevla_ros.sim_bridge_node import (
    ACTION_TOPIC,
    COMMAND_QOS,
    EE_DELTA_TOPIC,
    GRIPPER_TOPIC,
    IMAGE_TOPIC,
    PRIVILEGED_STATE_TOPIC,
    RESET_SERVICE,
    STATE_QOS,
    STATUS_QOS,
    STATUS_TOPIC,
    ns_to_stamp,
    stamp_ns,
)

RATIONALE_STRUCTURED_TOPIC = "/refinevla/rationale_structured"  # policy_node's refinevla/Rationale
# policy_node settings for evaluation: one step per new image, a watchdog longer than any model step, the deltas'
# frame = the bridge's world, and per-step limits equal to the simulator's own (0.1 m per axis; rotations are limited
# by the simulator by norm), so the node changes no action the in-process runner would execute
POLICY_NODE_EVAL_PARAMS: dict[str, Any] = {
    "control_rate_hz": 0.0, "image_timeout_s": 600.0, "delta_frame_id": "world",
    "safety.max_delta": [0.1, 0.1, 0.1, 3.2, 3.2, 3.2],
}


class BridgeTimeoutError(TimeoutError):
    """The bridge did not answer in time; the message says what was awaited."""


def episode_of(response: ResetEpisode.Response) -> int:
    """The bridge's episode index from a ResetEpisode response (its message starts with 'episode <n>:')."""
    match = re.match(r"episode (\d+):", response.message)
    if match is None:
        raise RuntimeError(f"unexpected ResetEpisode answer {response.message!r}: is this sim_bridge_node?")
    return int(match.group(1))


class BridgeClient:
    """Reset / observe / act against sim_bridge_node from a node the caller spins with `executor`."""

    def __init__(self, node: Node, executor: SingleThreadedExecutor, use_privileged_state: bool = False,
                 timeout_s: float = 60.0) -> None:
        self.node, self.executor, self.timeout_s = node, executor, timeout_s
        self.images: dict[int, Image] = {}
        self.states: dict[int, dict[str, Any]] = {}
        self.statuses: list[EpisodeStatus] = []
        node.create_subscription(Image, IMAGE_TOPIC, self._on_image, qos_profile_sensor_data)
        node.create_subscription(EpisodeStatus, STATUS_TOPIC, self.statuses.append, STATUS_QOS)
        if use_privileged_state:
            node.create_subscription(String, PRIVILEGED_STATE_TOPIC, self._on_state, STATE_QOS)
        self.delta_pub = node.create_publisher(EndEffectorDelta, EE_DELTA_TOPIC, COMMAND_QOS)
        self.gripper_pub = node.create_publisher(Float64, GRIPPER_TOPIC, COMMAND_QOS)
        self.reset_client = node.create_client(ResetEpisode, RESET_SERVICE)
        self.episode_timeout_s = 600.0
        self.actions: dict[int, Action] = {}  # image stamp -> the policy node's Action (watch_episode)
        self.rationales: dict[int, str] = {}  # rationale id -> text
        self.keep_images = 8

    def watch_policy_node(self, keep_images: int = 200) -> None:
        """Also record policy_node's actions and rationales (and more images, for videos)."""
        self.keep_images = keep_images
        self.node.create_subscription(Action, ACTION_TOPIC, self._on_action, COMMAND_QOS)
        self.node.create_subscription(RationaleMsg, RATIONALE_STRUCTURED_TOPIC,
                                      lambda m: self.rationales.__setitem__(int(m.id), m.text), COMMAND_QOS)

    def _on_action(self, msg: Action) -> None:
        self.actions[stamp_ns(msg.header.stamp)] = msg
        if len(self.actions) > 400:
            for k in sorted(self.actions)[:-200]:
                del self.actions[k]

    # ---- plumbing ----------------------------------------------------------------------------------------------------
    def _on_image(self, msg: Image) -> None:
        self.images[stamp_ns(msg.header.stamp)] = msg
        if len(self.images) > self.keep_images:  # keep the newest few
            for k in sorted(self.images)[:-self.keep_images]:
                del self.images[k]

    def _on_state(self, msg: String) -> None:
        payload = json.loads(msg.data)
        ns = int(payload["stamp"]["sec"]) * 1_000_000_000 + int(payload["stamp"]["nanosec"])
        self.states[ns] = payload["state"]
        if len(self.states) > 8:
            for k in sorted(self.states)[:-8]:
                del self.states[k]

    def spin_until(self, predicate: Any, what: str, timeout_s: float | None = None) -> Any:
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            self.executor.spin_once(timeout_sec=0.005)
        value = predicate()
        if not value:
            raise BridgeTimeoutError(f"timed out after {timeout_s or self.timeout_s:.0f} s waiting for {what}; is "
                                "sim_bridge_node running on this ROS domain?")
        return value

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        self.spin_until(self.reset_client.service_is_ready, f"the {RESET_SERVICE} service", timeout_s)

    def reset(self, seed: int, task: str = "") -> ResetEpisode.Response:
        request = ResetEpisode.Request(task=task, seed=int(seed))
        future = self.reset_client.call_async(request)
        response = self.spin_until(lambda: future.done() and future.result(), f"{RESET_SERVICE} to answer",
                                   timeout_s=max(self.timeout_s, 120.0))
        if not response.success:
            raise RuntimeError(f"the bridge could not reset to {task or '(current task)'} seed {seed}: "
                               f"{response.message}")
        return response

    def send(self, stamp_ns_: int, action: np.ndarray) -> None:
        """The EE delta (stamped with the image it was computed from), then its gripper, as policy_node does."""
        header = Header(stamp=ns_to_stamp(stamp_ns_), frame_id="world")
        self.delta_pub.publish(delta_to_msg(action[:6], header))
        self.gripper_pub.publish(Float64(data=float(action[6])))

    # ---- an episode --------------------------------------------------------------------------------------------------
    def run_episode(self, policy: Any, seed: int, task: str = "", record_frames: bool = False,
                    state_box: dict[str, Any] | None = None) -> EpisodeResult:
        """Reset to (task, seed), act until EpisodeStatus says done. `state_box["state"]` receives the privileged
        state of each observation (for a ScriptedExpertPolicy reading it)."""
        t0 = time.perf_counter()
        response = self.reset(seed, task)
        episode = episode_of(response)

        def first_status() -> EpisodeStatus | None:
            return next((s for s in self.statuses if s.episode == episode and s.step == 0), None)

        status = self.spin_until(first_status, f"the first EpisodeStatus of episode {episode} (seed {seed})")
        policy.reset()
        result = EpisodeResult(task=status.task, seed=seed, instruction=response.instruction, success=False,
                               final_success=False, steps=0, total_reward=0.0, wall_s=0.0,
                               frames=[] if record_frames else None, via="ros")
        while True:
            if status.done:
                break
            ns = stamp_ns(status.header.stamp)
            image_msg = self.spin_until(lambda ns=ns: self.images.get(ns), f"the camera image of step {status.step}")
            image = image_to_rgb(image_msg)
            if state_box is not None:
                state_box["state"] = self.spin_until(lambda ns=ns: self.states.get(ns),
                                                     f"the privileged state of step {status.step} (is the bridge "
                                                     "running with publish_privileged_state:=true?)")
            if record_frames:
                result.frames.append(image)
            tp = time.perf_counter()
            output = policy.predict(image, status.instruction)
            result.policy_ms.append((time.perf_counter() - tp) * 1000.0)
            action = np.asarray(getattr(output, "action", output), dtype=np.float64).reshape(-1)
            result.actions.append([round(float(v), 6) for v in action])
            result.captions.append(_caption(output))
            self.send(ns, action)
            status = self.spin_until(
                lambda ns=ns: next((s for s in self.statuses if s.episode == episode
                                    and stamp_ns(s.header.stamp) > ns), None),
                f"the bridge to step (seed {seed}, step {status.step})")
            result.total_reward += status.reward
        if record_frames:  # the final observation, for the video (best effort: the camera topic may drop it)
            last = self.images.get(stamp_ns(status.header.stamp))
            if last is None:
                with contextlib.suppress(BridgeTimeoutError):
                    last = self.spin_until(lambda: self.images.get(stamp_ns(status.header.stamp)), "the final image",
                                           2.0)
            if last is not None:
                result.frames.append(image_to_rgb(last))
        result.steps, result.success, result.final_success = status.step, status.ever_success, status.success
        result.wall_s = time.perf_counter() - t0
        self.statuses[:] = self.statuses[-4:]
        return result

    def watch_episode(self, seed: int, task: str = "", record_frames: bool = False) -> EpisodeResult:
        """Reset to (task, seed) and watch another node (policy_node) act until EpisodeStatus says done; actions,
        latencies and rationales come from its /refinevla/action and /refinevla/rationale topics."""
        t0 = time.perf_counter()
        response = self.reset(seed, task)
        episode = episode_of(response)
        first = self.spin_until(lambda: next((s for s in self.statuses if s.episode == episode and s.step == 0),
                                             None), f"the first EpisodeStatus of episode {episode} (seed {seed})")
        result = EpisodeResult(task=first.task, seed=seed, instruction=response.instruction, success=False,
                               final_success=False, steps=0, total_reward=0.0, wall_s=0.0,
                               frames=[] if record_frames else None, via="ros-policy-node")
        last = self.spin_until(lambda: next((s for s in self.statuses if s.episode == episode and s.done), None),
                               f"episode {episode} (seed {seed}) to finish", timeout_s=self.episode_timeout_s)
        statuses = sorted((s for s in self.statuses if s.episode == episode), key=lambda s: s.step)
        for status in statuses[:-1]:
            ns = stamp_ns(status.header.stamp)
            action = self.actions.get(ns)
            if action is not None:
                result.actions.append([round(float(v), 6) for v in (*msg_to_delta(action.delta), action.gripper)])
                result.policy_ms.append(float(action.inference_latency_ms))
                result.captions.append(self.rationales.get(action.rationale_id, ""))
            if record_frames and ns in self.images:
                result.frames.append(image_to_rgb(self.images[ns]))
        if record_frames and stamp_ns(last.header.stamp) in self.images:
            result.frames.append(image_to_rgb(self.images[stamp_ns(last.header.stamp)]))
        result.total_reward = float(sum(s.reward for s in statuses[1:]))
        result.steps, result.success, result.final_success = last.step, last.ever_success, last.success
        result.wall_s = time.perf_counter() - t0
        self.statuses[:] = self.statuses[-4:]
        return result


def _ros_args(params: dict[str, Any]) -> list[str]:
    out = []
    for k, v in params.items():
        if isinstance(v, bool):
            value = str(v).lower()
        elif isinstance(v, (list, tuple)):
            value = "[" + ",".join(str(x) for x in v) + "]"
        else:
            value = str(v)
        out += ["-p", f"{k}:={value}"]
    return out


def bridge_command(sim: SimConfig, privileged_state: bool, overrides: dict[str, Any] | None = None) -> list[str]:
    """`python -m refinevla_ros.sim_bridge_node` with lockstep stepping that waits for every action (the same
    numbers as in-process: no hold step is ever inserted by a slow policy)."""
    params: dict[str, Any] = {f"sim.{k}": v for k, v in dataclasses.asdict(sim).items()}
    params.update({"step_mode": "lockstep", "action_timeout_s": 0.0, "publish_privileged_state": privileged_state})
    params.update(overrides or {})
    return [sys.executable, "-m", "refinevla_ros.sim_bridge_node", "--ros-args", *_ros_args(params)]


@contextlib.contextmanager
def node_subprocess(command: list[str], log_path: Path | None = None) -> Iterator[Any]:
    """A node in its own process (its own session: stopped with SIGINT, killed if it hangs)."""
    log = log_path.open("wb") if log_path else subprocess.DEVNULL  # closed below
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        if log_path:
            log.close()


def bridge_process(sim: SimConfig, privileged_state: bool, log_path: Path | None = None,
                   overrides: dict[str, Any] | None = None) -> contextlib.AbstractContextManager[Any]:
    return node_subprocess(bridge_command(sim, privileged_state, overrides), log_path)


def evaluate_via_ros(make_policy: Callable[[Callable[[], dict]], Any] | None, tasks: list[str], episodes: int, *,
                     seed: int = 0, sim: SimConfig | None = None, videos_per_task: int = 0,
                     on_episode: Callable[[EpisodeResult], None] | None = None,
                     privileged_state: bool = False, timeout_s: float = 120.0,
                     policy_node_params: dict[str, Any] | None = None) -> list[EpisodeResult]:
    """The ROS twin of refinevla_core.eval.runner.evaluate: starts a sim_bridge_node and either drives it from a
    client node with `make_policy(state_fn)`, or, with `policy_node_params` (e.g. {"checkpoint": path}), starts
    refinevla_ros.policy_node with them (plus POLICY_NODE_EVAL_PARAMS) and only resets and watches."""
    import rclpy
    from rclpy.context import Context

    sim = dataclasses.replace(sim or SimConfig(), task=tasks[0])
    logs = {name: Path(tempfile.mkstemp(prefix=f"{name}-", suffix=".log")[1]) for name in ("sim_bridge", "policy")}
    results: list[EpisodeResult] = []
    with contextlib.ExitStack() as stack:
        procs = {"sim_bridge": stack.enter_context(bridge_process(sim, privileged_state, logs["sim_bridge"]))}
        if policy_node_params is not None:
            command = [sys.executable, "-m", "refinevla_ros.policy_node", "--ros-args",
                       *_ros_args({**POLICY_NODE_EVAL_PARAMS, **policy_node_params})]
            procs["policy"] = stack.enter_context(node_subprocess(command, logs["policy"]))

        def logs_text() -> str:
            return "\n".join(f"--- {name} log ({logs[name]}):\n{logs[name].read_text(errors='replace')[-2000:]}"
                             for name in procs)

        ctx = Context()
        rclpy.init(context=ctx)
        node = rclpy.create_node("refinevla_eval", context=ctx)
        executor = SingleThreadedExecutor(context=ctx)
        executor.add_node(node)
        try:
            client = BridgeClient(node, executor, use_privileged_state=privileged_state, timeout_s=timeout_s)
            if policy_node_params is not None:
                client.watch_policy_node()
            client.wait_ready()
            box: dict[str, Any] = {}
            policy = make_policy(lambda: box["state"]) if policy_node_params is None else None
            for task in tasks:
                for i in range(episodes):
                    dead = [name for name, proc in procs.items() if proc.poll() is not None]
                    if dead:
                        raise RuntimeError(f"{', '.join(dead)} exited:\n{logs_text()}")
                    record = i < videos_per_task
                    if policy is None:
                        r = client.watch_episode(seed + i, task=task, record_frames=record)
                    else:
                        r = client.run_episode(policy, seed + i, task=task, record_frames=record,
                                               state_box=box if privileged_state else None)
                    results.append(r)
                    if on_episode is not None:
                        on_episode(r)
        except BridgeTimeoutError as e:
            raise RuntimeError(f"{e}\n{logs_text()}") from e
        finally:
            executor.shutdown()
            node.destroy_node()
            rclpy.shutdown(context=ctx)
    return results
