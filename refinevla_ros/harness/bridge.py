"""The bridge client: resets, observes and (when it drives) acts on a running sim_bridge_node, or watches a
policy_node act on it. `refinevla eval --via ros*`, the demo's lanes and `refinevla bench sim` all use it, so an
episode is reset, stepped, timed out and recorded by one set of rules and the paths agree number for number.

Episode rules:
- reset through the ResetEpisode service; the episode index comes from its answer ("episode <n>: ...");
- the first EpisodeStatus (step 0) of that index starts the episode; a done status ends it;
- watching: when the policy node has not acted on the first image after FIRST_ACTION_RETRY_S (the image was lost
  before its subscription matched), the same seed is reset again, at most MAX_FIRST_STEP_RETRIES times; no new
  simulator step for `step_timeout_s` fails the episode; the Action of the last step may arrive just after the final
  status and is waited for briefly.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from sensor_msgs.msg import Image
from std_msgs.msg import Float64, Header, String

from refinevla.msg import Action, EndEffectorDelta, EpisodeStatus
from refinevla.msg import Rationale as RationaleMsg
from refinevla.srv import ResetEpisode
from refinevla_core.eval.runner import (
    EpisodeResult,
    caption,  # one caption rule for every evaluation path
)
from refinevla_ros.conversions import delta_to_msg, image_to_rgb, ns_to_time, stamp_to_ns
from refinevla_ros.harness.session import RosSession, WaitTimeoutError
from refinevla_ros.topics import (
    ACTION_TOPIC,
    CAMERA_QOS,
    COMMAND_QOS,
    DIAGNOSTICS_TOPIC,
    EE_DELTA_TOPIC,
    GRIPPER_TOPIC,
    IMAGE_TOPIC,
    LATCHED_QOS,
    PRIVILEGED_STATE_TOPIC,
    RATIONALE_STRUCTURED_TOPIC,
    RESET_SERVICE,
    STATUS_TOPIC,
)

FIRST_ACTION_RETRY_S = 60.0
MAX_FIRST_STEP_RETRIES = 2
RESET_TIMEOUT_S = 120.0
LAST_ACTION_WAIT_S = 2.0
KEEP_IDS = 400  # rationale ids remembered for captions (a rationale may be cited for many steps)


class BridgeTimeoutError(WaitTimeoutError):
    """The bridge (or the policy node) did not answer in time; the message says what was awaited."""


class EpisodeError(RuntimeError):
    """An episode cannot go on (no step for too long, a policy node that never acts, an unexpected answer)."""


def episode_of(response: ResetEpisode.Response) -> int:
    """The bridge's episode index from a ResetEpisode response (its message starts with 'episode <n>:')."""
    match = re.match(r"episode (\d+):", response.message)
    if match is None:
        raise EpisodeError(f"unexpected ResetEpisode answer {response.message!r}: is this sim_bridge_node?")
    return int(match.group(1))


@dataclasses.dataclass
class WatchedEpisode:
    """What the bridge and the policy node published during one episode, aligned by image stamp."""

    seed: int
    instruction: str
    statuses: list[EpisodeStatus]  # by step; the last one is done
    actions: dict[int, list[Action]]  # image stamp -> the Actions computed from it (normally one)
    rationales: dict[int, RationaleMsg]  # image stamp -> the Rationale written for it
    rationale_texts: dict[int, str]  # rationale id -> text (an Action cites the rationale it acted under)
    images: dict[int, Image]  # image stamp -> the camera image (when the client listens to the camera)
    first_step_resets: int
    wall_s: float

    @property
    def last(self) -> EpisodeStatus:
        return self.statuses[-1]

    def acted_on(self) -> list[tuple[EpisodeStatus, list[Action]]]:
        """Every observation the policy acted on (all statuses but the final one) with its Actions."""
        return [(s, self.actions.get(stamp_to_ns(s.header.stamp), [])) for s in self.statuses[:-1]]


class BridgeClient:
    """Reset / observe / act against sim_bridge_node from `session`'s node.

    drive: publish EE deltas and gripper commands (run_episode); otherwise only watch another node act.
    watch_policy: also record the policy node's Action, Rationale and diagnostics (watch_episode).
    camera: subscribe to the camera (needed to drive, and for frames); `keep_images` newest are kept.
    """

    def __init__(self, session: RosSession, *, drive: bool = True, watch_policy: bool = False, camera: bool = True,
                 privileged_state: bool = False, timeout_s: float = 60.0, step_timeout_s: float = 120.0,
                 keep_images: int = 8) -> None:
        self.session, self.node = session, session.node
        self.timeout_s, self.step_timeout_s, self.keep_images = timeout_s, step_timeout_s, keep_images
        self.images: dict[int, Image] = {}
        self.states: dict[int, dict[str, Any]] = {}
        self.statuses: list[EpisodeStatus] = []
        self.actions: dict[int, list[Action]] = {}
        self.rationales: dict[int, RationaleMsg] = {}
        self.rationale_texts: dict[int, str] = {}
        self.policy_state = ""
        self.camera = camera
        node = self.node
        node.create_subscription(EpisodeStatus, STATUS_TOPIC, self.statuses.append, LATCHED_QOS)
        if camera:
            node.create_subscription(Image, IMAGE_TOPIC, self._on_image, CAMERA_QOS)
        if privileged_state:
            node.create_subscription(String, PRIVILEGED_STATE_TOPIC, self._on_state, LATCHED_QOS)
        if drive:
            self.delta_pub = node.create_publisher(EndEffectorDelta, EE_DELTA_TOPIC, COMMAND_QOS)
            self.gripper_pub = node.create_publisher(Float64, GRIPPER_TOPIC, COMMAND_QOS)
        if watch_policy:
            node.create_subscription(Action, ACTION_TOPIC, self._on_action, COMMAND_QOS)
            node.create_subscription(RationaleMsg, RATIONALE_STRUCTURED_TOPIC, self._on_rationale, COMMAND_QOS)
            node.create_subscription(DiagnosticArray, DIAGNOSTICS_TOPIC, self._on_diagnostics, 10)
        self.reset_client = node.create_client(ResetEpisode, RESET_SERVICE)

    # ---- callbacks ---------------------------------------------------------------------------------------------------
    def _on_image(self, msg: Image) -> None:
        self.images[stamp_to_ns(msg.header.stamp)] = msg
        _keep_newest(self.images, self.keep_images)

    def _on_state(self, msg: String) -> None:
        payload = json.loads(msg.data)
        ns = stamp_to_ns(payload["stamp"])
        self.states[ns] = payload["state"]
        _keep_newest(self.states, 8)

    def _on_action(self, msg: Action) -> None:
        self.actions.setdefault(stamp_to_ns(msg.header.stamp), []).append(msg)

    def _on_rationale(self, msg: RationaleMsg) -> None:
        self.rationales[stamp_to_ns(msg.header.stamp)] = msg
        self.rationale_texts[int(msg.id)] = msg.text
        _keep_newest(self.rationale_texts, KEEP_IDS)

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name.startswith("policy_node"):
                values = {kv.key: kv.value for kv in status.values}
                self.policy_state = values.get("state", self.policy_state)

    # ---- waiting -----------------------------------------------------------------------------------------------------
    def spin_until(self, predicate: Callable[[], Any], what: str, timeout_s: float | None = None) -> Any:
        """The predicate's first truthy value; BridgeTimeoutError naming `what` when it does not come in time."""
        timeout_s = timeout_s or self.timeout_s
        value = self.session.wait(predicate, timeout_s)
        if not value:
            raise BridgeTimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}; is sim_bridge_node "
                                     "running on this ROS domain?")
        return value

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        self.spin_until(self.reset_client.service_is_ready, f"the {RESET_SERVICE} service", timeout_s)

    def wait_for_policy_node(self, timeout_s: float = 300.0) -> None:
        """policy_node loaded its policy, is active, and listens to the camera (then a moment for the bridge's camera
        publisher to match the new subscription)."""
        self.policy_state = ""
        own = 1 if self.camera else 0
        self.spin_until(lambda: self.policy_state == "active" and self.node.count_subscribers(IMAGE_TOPIC) > own,
                        "policy_node to load its policy and become active", timeout_s)
        self.session.spin_for(0.5)

    def status(self, episode: int, step: int | None = None, done: bool = False) -> EpisodeStatus | None:
        """The first status of `episode` (at `step`, or a done one) received so far."""
        for s in self.statuses:
            if s.episode == episode and (step is None or s.step == step) and (not done or s.done):
                return s
        return None

    def next_status(self, episode: int, after_ns: int) -> EpisodeStatus | None:
        """The first status of `episode` stamped after `after_ns` (the step that answers an action)."""
        return next((s for s in self.statuses if s.episode == episode and stamp_to_ns(s.header.stamp) > after_ns),
                    None)

    # ---- commands ----------------------------------------------------------------------------------------------------
    def reset(self, seed: int, task: str = "") -> ResetEpisode.Response:
        future = self.reset_client.call_async(ResetEpisode.Request(task=task, seed=int(seed)))
        response = self.spin_until(lambda: future.done() and future.result(), f"{RESET_SERVICE} to answer",
                                   timeout_s=max(self.timeout_s, RESET_TIMEOUT_S))
        if not response.success:
            raise EpisodeError(f"the bridge could not reset to {task or '(current task)'} seed {seed}: "
                               f"{response.message}")
        return response

    def start_episode(self, seed: int, task: str = "") -> tuple[ResetEpisode.Response, EpisodeStatus]:
        """Reset and wait for the episode's first status."""
        response = self.reset(seed, task)
        episode = episode_of(response)
        first = self.spin_until(lambda: self.status(episode, step=0),
                                f"the first EpisodeStatus of episode {episode} (seed {seed})")
        return response, first

    def send(self, stamp_ns: int, action: np.ndarray) -> None:
        """The EE delta (stamped with the image it was computed from), then its gripper, as policy_node does."""
        header = Header(stamp=ns_to_time(stamp_ns), frame_id="world")
        self.delta_pub.publish(delta_to_msg(action[:6], header))
        self.gripper_pub.publish(Float64(data=float(action[6])))

    def forget(self, episode: int) -> None:
        """Drop what was recorded for episodes up to `episode` (keeps memory flat over long evaluations)."""
        stamps = {stamp_to_ns(s.header.stamp) for s in self.statuses if s.episode <= episode}
        for ns in stamps:
            self.actions.pop(ns, None)
            self.rationales.pop(ns, None)
        self.statuses[:] = [s for s in self.statuses if s.episode > episode]

    # ---- driving: this process is the policy node ---------------------------------------------------------------
    def run_episode(self, policy: Any, seed: int, task: str = "", record_frames: bool = False,
                    state_box: dict[str, Any] | None = None) -> EpisodeResult:
        """Reset to (task, seed), act with `policy.predict` on each image until EpisodeStatus says done.
        `state_box["state"]` receives the privileged state of each observation (for a ScriptedExpertPolicy)."""
        started = time.perf_counter()
        response, status = self.start_episode(seed, task)
        episode = status.episode
        policy.reset()
        result = EpisodeResult(task=status.task, seed=seed, instruction=response.instruction, success=False,
                               final_success=False, steps=0, total_reward=0.0, wall_s=0.0,
                               frames=[] if record_frames else None, via="ros")
        while not status.done:
            ns = stamp_to_ns(status.header.stamp)
            image = image_to_rgb(self.spin_until(lambda ns=ns: self.images.get(ns),
                                                 f"the camera image of step {status.step}"))
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
            result.captions.append(caption(output))
            self.send(ns, action)
            status = self.spin_until(lambda ns=ns: self.next_status(episode, ns),
                                     f"the bridge to step (seed {seed}, step {status.step})")
            result.total_reward += status.reward
        if record_frames and (last := self._final_image(status)) is not None:
            result.frames.append(image_to_rgb(last))
        result.steps, result.success, result.final_success = status.step, status.ever_success, status.success
        result.wall_s = time.perf_counter() - started
        self.statuses[:] = self.statuses[-4:]
        return result

    def _final_image(self, status: EpisodeStatus) -> Image | None:
        """The final observation, for the video (best effort: the camera topic may drop it)."""
        ns = stamp_to_ns(status.header.stamp)
        return self.images.get(ns) or self.session.wait(lambda: self.images.get(ns), 2.0)

    # ---- watching a policy node --------------------------------------------------------------------------------------
    def watch_episode(self, seed: int, task: str = "") -> WatchedEpisode:
        """Reset to (task, seed) and watch the policy node act until the episode is done (the rules above)."""
        started = time.perf_counter()
        response, first, retries = self._start_acted_episode(seed, task)
        episode = first.episode
        self._wait_done(episode, seed)
        statuses = sorted((s for s in self.statuses if s.episode == episode), key=lambda s: s.step)
        stamps = [stamp_to_ns(s.header.stamp) for s in statuses if not s.done]
        self.session.wait(lambda: all(ns in self.actions for ns in stamps), LAST_ACTION_WAIT_S)
        stamps = [stamp_to_ns(s.header.stamp) for s in statuses]
        watched = WatchedEpisode(
            seed=seed, instruction=response.instruction, statuses=statuses,
            actions={ns: self.actions[ns] for ns in stamps if ns in self.actions},
            rationales={ns: self.rationales[ns] for ns in stamps if ns in self.rationales},
            rationale_texts=dict(self.rationale_texts), images={ns: self.images[ns] for ns in stamps
                                                                if ns in self.images},
            first_step_resets=retries, wall_s=time.perf_counter() - started)
        self.forget(episode)
        return watched

    def _start_acted_episode(self, seed: int, task: str) -> tuple[ResetEpisode.Response, EpisodeStatus, int]:
        """Reset until the policy node acts on the episode's first image (or the episode ends at once)."""
        for retries in range(MAX_FIRST_STEP_RETRIES + 1):
            response, first = self.start_episode(seed, task)
            first_ns = stamp_to_ns(first.header.stamp)
            if self.session.wait(lambda ns=first_ns, e=first.episode: ns in self.actions
                                 or self.status(e, done=True), FIRST_ACTION_RETRY_S):
                return response, first, retries
        raise EpisodeError(f"policy_node never acted on the first image of seed {seed} "
                           f"({MAX_FIRST_STEP_RETRIES + 1} resets)")

    def _wait_done(self, episode: int, seed: int) -> None:
        """Spin until `episode` is done; EpisodeError when the simulator makes no step for step_timeout_s."""
        seen, last_progress = 0, time.monotonic()
        while self.status(episode, done=True) is None:
            count = sum(1 for s in self.statuses if s.episode == episode)
            if count != seen:
                seen, last_progress = count, time.monotonic()
            if time.monotonic() - last_progress > self.step_timeout_s:
                raise EpisodeError(f"seed {seed}: no simulator step for {self.step_timeout_s:.0f} s (after step "
                                   f"{seen - 1})")
            self.session.check()
            self.session.spin_once(0.01)


def _keep_newest(by_key: dict[int, Any], keep: int) -> None:
    if len(by_key) > keep:
        for k in sorted(by_key)[:-keep]:
            del by_key[k]
