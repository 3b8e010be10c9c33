"""PolicyRunner: the rules between a camera, a policy and a robot, without ROS — so the policy node is wiring and
every rule here is tested without DDS (test/core/test_policy_runner.py).

What it owns:
- episodes: a new instruction is a new episode (policy.reset(), step count from 0); a result computed for the
  previous instruction is never published;
- holds (zero motion, gripper unchanged, with a reason): disabled, no instruction, no / stale / frozen camera
  (StaleImageWatchdog on arrival and repeated stamps), a stamp older than image_timeout_s + clock_offset_tolerance_s
  on the node clock, inference slower than image_timeout_s, a policy error, an output that is not a PolicyOutput,
  NaN/inf (ActionGuard), with per-axis clipping and workspace bounds from refinevla_core.safety;
- lock-step (control_rate_hz 0): a re-sent image (same stamp, same episode) is not a new step;
- rationale ids (Action.rationale_id <-> Rationale.id), step indices, timings and statistics, and the once-only
  advice on which rationale mode keeps the control rate.

Threads: `image_arrived` and `set_instruction` run on the caller's callback thread, `step` on one worker thread,
`commit` under the caller's publish lock; the shared state is guarded by `self._lock`.
"""

from __future__ import annotations

import collections
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from refinevla_core.inference.config import RunnerConfig
from refinevla_core.inference.types import PolicyLike, PolicyOutput
from refinevla_core.safety import ActionGuard, GuardedStep, StaleImageWatchdog

WARN_PERIOD_S = 5.0
ADVICE_AFTER_STEPS = 5  # model steps measured before the rationale-mode advice is given
Log = Callable[[str, str], None]  # (level "info" | "warning", message)


@dataclass
class StepResult:
    """One step to publish. stamp_ns: the stamp of the image it was computed from (None: stamp it now)."""

    step: GuardedStep
    stamp_ns: int | None = None
    output: PolicyOutput | None = None  # None for holds decided before the model ran
    latency_ms: float = 0.0  # the model's time for this step (predict call)
    episode: int = 0


@dataclass
class Committed:
    """What `commit` decided for a published step: its index and rationale id, and whether to publish the
    rationale now (a fresh one, or the first of a run) or later (streaming: `pending`)."""

    step_index: int
    rationale_id: int = 0
    publish_rationale: bool = False
    pending: Any = None  # a Future resolving to a LateRationale (streaming)


@dataclass
class RunnerStats:
    images_received: int = 0
    images_used: int = 0
    bad_images: int = 0
    steps: int = 0
    holds: collections.Counter = field(default_factory=collections.Counter)
    overruns: int = 0
    instructions: int = 0
    instructions_rejected: int = 0
    latency_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=100))
    # per model step, ms: image received -> the model starts; action ready -> everything published
    before_predict_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=100))
    after_predict_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=100))
    rationale_age_steps: collections.deque = field(default_factory=lambda: collections.deque(maxlen=100))
    rationale_age_s: collections.deque = field(default_factory=lambda: collections.deque(maxlen=100))
    last_hold_reason: str = ""


def _median(values: Any) -> float | str:
    return float(np.median(values)) if values else ""


class PolicyRunner:
    """Drives a PolicyLike under the rules above. Times: `monotonic()` seconds for arrival and latency, `clock_ns()`
    (the node clock, the camera's stamps' clock) for stamp age."""

    def __init__(self, policy: PolicyLike, config: RunnerConfig, log: Log | None = None, *,
                 clock_ns: Callable[[], int] = time.time_ns, monotonic: Callable[[], float] = time.monotonic,
                 camera: str = "the camera topic", instruction_topic: str = "the instruction topic") -> None:
        self.policy = policy
        self.camera, self.instruction_topic = camera, instruction_topic
        self.config = config
        self.guard = ActionGuard(config.safety)
        self.watchdog = StaleImageWatchdog(config.image_timeout_s, repeats_are_new=config.lock_step)
        self.stats = RunnerStats()
        self._log = log or (lambda level, message: None)
        self._clock_ns = clock_ns
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._instruction = ""
        self._episode = 0
        self._policy_episode: int | None = None  # the episode the policy was last reset for
        self._last_stamp_ns: int | None = None  # of the image the last model step used
        self._step_index = 0
        self._rationale_id = 0
        self._warned: dict[str, float] = {}
        self._once: set[str] = set()

    # ---- inputs (callback thread) -------------------------------------------------------------------------------

    @property
    def instruction(self) -> str:
        return self._instruction

    @property
    def episode(self) -> int:
        return self._episode

    def set_instruction(self, text: str) -> int:
        """A new instruction starts a new episode (even the same text again); returns the episode number."""
        with self._lock:
            self._instruction = text
            self._episode += 1
            self.stats.instructions += 1
            return self._episode

    def image_arrived(self, stamp_ns: int, now: float | None = None) -> None:
        """An image arrived (`stamp_ns` 0: unstamped, judged by arrival only)."""
        now = self._monotonic() if now is None else now
        with self._lock:
            self.stats.images_received += 1
            self.watchdog.image_received(now, stamp_ns)
        if stamp_ns == 0:
            self._warn_once("unstamped", "camera images carry no header stamp: stale images are judged by arrival "
                                         "only (a frozen driver re-sending its last frame cannot be detected)")

    def start(self) -> None:
        """Control starts (activate): the target restarts at the workspace start; wait for a fresh image."""
        self.guard.reset_target()
        with self._lock:
            self.watchdog.start(self._monotonic())

    # ---- holds --------------------------------------------------------------------------------------------------

    def hold(self, reason: str, stamp_ns: int | None = None) -> StepResult:
        return StepResult(self.guard.hold(reason), stamp_ns, episode=self._episode)

    def bad_image(self, reason: str, stamp_ns: int | None = None) -> StepResult:
        self.stats.bad_images += 1
        self.warn(f"image:{reason[:40]}", f"{reason}; holding still")
        return self.hold(reason, stamp_ns)

    def check_camera(self) -> StepResult | None:
        """A hold when there is no recent (new) camera image, warned once per stale period; else None."""
        with self._lock:
            status = self.watchdog.check(self._monotonic())
        if not status.stale:
            return None
        if status.warn:
            self._log("warning", f"{status.reason} on {self.camera}: publishing zero motion until images arrive "
                                 "(check the camera driver and topic remapping)")
        return self.hold(status.reason)

    def camera_stale(self) -> bool:
        """For diagnostics: no side effects."""
        with self._lock:
            return self.watchdog.status(self._monotonic()).stale

    # ---- one model step (worker thread) ---------------------------------------------------------------------------

    def step(self, rgb: np.ndarray, stamp_ns: int, received_at: float) -> StepResult | None:
        """One model step on `rgb` (stamp `stamp_ns`, arrived at monotonic `received_at`); None when there is
        nothing to publish (a lock-step re-send, or a result for an instruction that was replaced meanwhile)."""
        with self._lock:
            instruction, episode = self._instruction, self._episode
        if (self.config.lock_step and stamp_ns != 0 and stamp_ns == self._last_stamp_ns
                and episode == self._policy_episode):
            return None  # lock-step: the same image re-sent (a simulator waiting for us) is not a new step
        if not instruction:
            self.warn("instruction", f"no instruction yet: publish one on {self.instruction_topic} (std_msgs/String);"
                                     " holding still")
            return self.hold("no instruction", stamp_ns)
        too_old = self._stamp_too_old(stamp_ns)
        if too_old:
            return self.hold(too_old, stamp_ns)
        if episode != self._policy_episode:
            self.policy.reset()  # a new instruction starts a new episode: rationale cache cleared
            self._policy_episode = episode
            with self._lock:
                self._step_index = 0
        self.stats.images_used += 1
        self._last_stamp_ns = stamp_ns
        self.stats.before_predict_ms.append((self._monotonic() - received_at) * 1000.0)
        t0 = time.perf_counter()
        try:
            output = self.policy.predict(rgb, instruction)
        except Exception as e:
            self.warn(f"predict:{type(e).__name__}", f"policy.predict failed, holding still: {type(e).__name__}: {e}")
            return self.hold(f"policy error: {type(e).__name__}: {e}", stamp_ns)
        latency_ms = (time.perf_counter() - t0) * 1000.0
        self.stats.latency_ms.append(latency_ms)
        with self._lock:
            if self._episode != episode:
                return None  # computed for the previous instruction: nothing of it is published
        return self._guarded(output, stamp_ns, received_at, latency_ms, episode)

    def _guarded(self, output: Any, stamp_ns: int, received_at: float, latency_ms: float, episode: int
                 ) -> StepResult:
        if not isinstance(output, PolicyOutput):
            reason = (f"the policy returned {type(output).__name__}, not a PolicyOutput "
                      "(refinevla_core.inference.types)")
            self.warn("output-type", f"model output replaced by a hold: {reason}")
            return self.hold(reason, stamp_ns)
        age = self._monotonic() - received_at
        if age > self.config.image_timeout_s:
            step = self.guard.hold(f"inference took too long: the image was {age:.2f} s old when the action was "
                                   "ready")
        else:
            step = self.guard.check(output.action)
        if step.safe_hold:
            self.warn(f"hold:{step.reason[:30]}", f"model output replaced by a hold: {step.reason}")
        elif step.reason:
            self.warn(f"adjust:{step.reason[:20]}", f"model output adjusted: {step.reason}", level="info")
        if output.rationale_age_steps >= 0:
            self.stats.rationale_age_steps.append(output.rationale_age_steps)
            self.stats.rationale_age_s.append(output.rationale_age_s)
        self._advise(output, latency_ms)
        return StepResult(step, stamp_ns, output, latency_ms, episode)

    def _stamp_too_old(self, stamp_ns: int) -> str:
        """The hold reason when a stamped image is older than the limit on the node clock (rate mode only: in
        lock-step the stamp names a simulator observation and the simulator waits for us)."""
        if stamp_ns == 0 or self.config.lock_step:
            return ""
        age = (self._clock_ns() - stamp_ns) / 1e9
        limit = self.config.image_timeout_s + self.config.clock_offset_tolerance_s
        if age <= limit:
            self._once.discard("old-stamp")
            return ""
        reason = (f"old camera stamp: the image is stamped {age:.2f} s before the node clock (limit {limit:.2f} s = "
                  "image_timeout_s + clock_offset_tolerance_s)")
        self._warn_once("old-stamp", f"{reason}; holding still. Check the camera driver's clock and time "
                                     "synchronisation (or raise clock_offset_tolerance_s)")
        return reason

    # ---- publishing bookkeeping (under the caller's publish lock) ------------------------------------------------

    def commit(self, result: StepResult) -> Committed:
        """Number the step and its rationale as it is published; count holds."""
        with self._lock:
            committed = Committed(step_index=self._step_index)
            self._step_index += 1
        self.stats.steps += 1
        if result.step.safe_hold:
            self.stats.holds[result.step.reason.split(":")[0]] += 1
            self.stats.last_hold_reason = result.step.reason
        output = result.output
        if output is None:
            return committed
        if output.rationale_pending is not None:
            self._rationale_id += 1
            committed.rationale_id, committed.pending = self._rationale_id, output.rationale_pending
        elif output.rationale is not None or output.rationale_text:
            if output.rationale_fresh or self._rationale_id == 0:
                self._rationale_id += 1
                committed.publish_rationale = True
            committed.rationale_id = self._rationale_id
        return committed

    # ---- logging, advice, diagnostics -----------------------------------------------------------------------------

    def warn(self, key: str, message: str, level: str = "warning") -> None:
        """Log once per key per WARN_PERIOD_S (distinct problems are each logged; repeats are throttled)."""
        now = self._monotonic()
        if now - self._warned.get(key, -1e9) < WARN_PERIOD_S:
            return
        self._warned[key] = now
        self._log(level, message)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._once:
            self._once.add(key)
            self._log("warning", message)

    def _advise(self, output: PolicyOutput, latency_ms: float) -> None:
        """Once, after a few model steps: say which rationale mode keeps the control rate if this one does not.
        Inline rationales (every_step, every_n) stall control when their slowest steps exceed the period; the other
        modes only when their typical (median) step does (an episode's first async step writes its rationale)."""
        if (self.config.control_rate_hz <= 0 or "advice" in self._once
                or len(self.stats.latency_ms) < ADVICE_AFTER_STEPS):
            return
        period_ms = 1000.0 / self.config.control_rate_hz
        mode = self.config.policy.rationale_mode
        slowest, median = max(self.stats.latency_ms), statistics.median(self.stats.latency_ms)
        inline = mode in ("every_step", "every_n")
        if (slowest if inline else median) <= period_ms:
            return
        self._once.add("advice")
        head = (f"steps take up to {slowest:.0f} ms (median {median:.0f} ms) against a {period_ms:.0f} ms control "
                f"period ({self.config.control_rate_hz:g} Hz)")
        if inline:
            self._log("warning", f"{head}: writing rationales inside the step stalls control. Set "
                                 "policy.rationale_mode:=async (rationale_then_action models) or streaming "
                                 "(action_then_rationale) to keep the rate, or action_only")
        else:
            action_ms = output.timings_ms.get("action", latency_ms)
            self._log("warning", f"{head}; the action alone takes ~{action_ms:.0f} ms: lower control_rate_hz to "
                                 f"{max(0.1, 1000.0 / (1.2 * median)):.1f} or use a faster device")

    def diagnostics(self) -> dict[str, Any]:
        """Counters and timings as plain values (the node adds its lifecycle state)."""
        s = self.stats
        lat = sorted(s.latency_ms)
        return {
            "episode": self._episode, "instruction": self._instruction[:200], "steps": s.steps,
            "holds": sum(s.holds.values()), "holds_by_reason": dict(s.holds), "last_hold_reason": s.last_hold_reason,
            "images_received": s.images_received, "images_used": s.images_used, "bad_images": s.bad_images,
            "images_dropped": max(0, s.images_received - s.images_used), "overruns": s.overruns,
            "instructions_rejected": s.instructions_rejected,
            "latency_ms_last": s.latency_ms[-1] if lat else "", "latency_ms_p50": lat[len(lat) // 2] if lat else "",
            "latency_ms_max": lat[-1] if lat else "",
            "image_to_predict_ms_p50": _median(s.before_predict_ms), "publish_ms_p50": _median(s.after_predict_ms),
            "rationale_age_steps_last": s.rationale_age_steps[-1] if s.rationale_age_steps else "",
            "rationale_age_s_last": s.rationale_age_s[-1] if s.rationale_age_s else "",
            "rationale_age_steps_p50": _median(s.rationale_age_steps),
        }


class LatestFrame:
    """One slot for the newest camera payload (latest wins, no queue), and the control loop's ticks over it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._payload: Any = None
        self._received_at = 0.0
        self._seq = 0

    def put(self, payload: Any, received_at: float) -> None:
        with self._cond:
            self._payload, self._received_at, self._seq = payload, received_at, self._seq + 1
            self._cond.notify_all()

    def wake(self) -> None:
        """Wake a waiting loop (to stop, or to re-check its state)."""
        with self._cond:
            self._cond.notify_all()

    def ticks(self, rate_hz: float, wait_s: float, stop: threading.Event, stats: RunnerStats
              ) -> Iterator[tuple[Any, float, bool]]:
        """(payload, received_at, new) per control step until `stop` is set: at rate_hz (an overrun restarts the
        schedule and is counted), or with rate_hz 0 whenever a new payload arrives, and at least every wait_s so
        the watchdog runs (new is False then)."""
        period = 1.0 / rate_hz if rate_hz > 0 else None
        next_tick, seen = time.monotonic(), -1
        while not stop.is_set():
            if period is not None:
                if stop.wait(max(0.0, next_tick - time.monotonic())):
                    return
                next_tick += period
                if next_tick < time.monotonic():  # the last step took longer than a period
                    stats.overruns += 1
                    next_tick = time.monotonic() + period
            with self._cond:
                if period is None:
                    self._cond.wait_for(lambda s=seen: self._seq != s or stop.is_set(), timeout=wait_s)
                payload, received_at, seq = self._payload, self._received_at, self._seq
            if stop.is_set():
                return
            new, seen = seq != seen or period is not None, seq
            yield payload, received_at, new
