"""Guards between a model's output and a robot: nothing unsafe is sent because of a bad model output or stale input.

ROS-free so the same decisions are made by the policy node, the WidowX adapter, the simulator bridge and offline
evaluation, and so they can be unit-tested without DDS:

- `clip_delta`: per-axis clipping of an EE delta (Bridge defaults: ±0.05 m, ±0.25 rad per step).
- non-finite guard: any NaN/inf in an action turns the whole step into a hold (zero motion, gripper unchanged).
- `clamp_to_workspace`: optional box bounds on the position of the TARGET pose the deltas integrate to.
- `sanitize_gripper`: Bridge convention 1 = open, 0 = closed; clipped to [0, 1], optionally binarised at 0.5.
- `StaleImageWatchdog`: is the newest camera image too old to act on? Judged by arrival and, for stamped images, by
  the stamp: a driver re-sending its last frame (same stamp) does not count as a new image. (warn once per period)
- `ActionGuard`: all of the above for one control step, keeping the integrated target and the last gripper command.

A "hold" is the safe output: zero delta (the arm stays at its current target) and the previous gripper command (an
object in the gripper is not dropped because the model produced garbage).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from refinevla_core.gripper import GRIPPER_OPEN  # Bridge convention: 1 = open, 0 = closed

TRANSLATION_AXES = ("x", "y", "z")
DELTA_AXES = ("x", "y", "z", "roll", "pitch", "yaw")


@dataclass
class SafetyConfig:
    """Per-step limits applied to every EE delta before it leaves the policy side (and again at the robot)."""

    # |dx|,|dy|,|dz| in metres and |droll|,|dpitch|,|dyaw| in radians per control step (bridge_data_robot's limits)
    max_delta: tuple[float, float, float, float, float, float] = (0.05, 0.05, 0.05, 0.25, 0.25, 0.25)
    # optional box for the TARGET position (m, robot base frame); Octo's WidowX bounds by default
    workspace_bounds: bool = False
    workspace_min: tuple[float, float, float] = (0.1, -0.15, -0.01)
    workspace_max: tuple[float, float, float] = (0.45, 0.25, 0.25)
    # where the policy node starts integrating deltas when it cannot measure the pose (the robot's start pose)
    workspace_start: tuple[float, float, float] = (0.3, 0.0, 0.15)
    # gripper: continuous in [0, 1] unless binarised (then < threshold closes, as bridge_data_robot and Octo do)
    binarize_gripper: bool = False
    gripper_threshold: float = 0.5

    def __post_init__(self) -> None:
        limits = np.asarray(self.max_delta, dtype=np.float64)
        if limits.shape != (6,) or not np.all(np.isfinite(limits)) or np.any(limits < 0):
            raise ValueError(f"max_delta must be 6 finite non-negative limits (x, y, z, roll, pitch, yaw); "
                             f"got {self.max_delta}")
        lo, hi, start = (np.asarray(v, dtype=np.float64) for v in
                         (self.workspace_min, self.workspace_max, self.workspace_start))
        for name, v in (("workspace_min", lo), ("workspace_max", hi), ("workspace_start", start)):
            if v.shape != (3,) or not np.all(np.isfinite(v)):
                raise ValueError(f"{name} must be 3 finite numbers (x, y, z in metres); got {v.tolist()}")
        if np.any(lo >= hi):
            raise ValueError(f"workspace_min {lo.tolist()} must be below workspace_max {hi.tolist()} on every axis")
        if not 0.0 < self.gripper_threshold < 1.0:
            raise ValueError(f"gripper_threshold must be between 0 and 1 (exclusive); got {self.gripper_threshold}")


@dataclass
class GuardedStep:
    """What may be sent for one control step."""

    delta: np.ndarray  # float64[6], finite, within limits
    gripper: float  # in [0, 1]
    safe_hold: bool = False  # the model output was replaced by "no motion"
    reason: str = ""  # why it was held, or what was changed (clipping, workspace); empty when passed unchanged
    clipped_axes: list[str] = field(default_factory=list)

    @property
    def action(self) -> np.ndarray:
        """float32[7]: the guarded delta plus gripper, as a PolicyOutput.action."""
        return np.concatenate([self.delta, [self.gripper]]).astype(np.float32)


def clip_delta(delta: np.ndarray, max_delta: tuple[float, ...] | np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Clip each of the six axes to ±max_delta; returns the clipped copy and the names of the axes that changed."""
    d = np.asarray(delta, dtype=np.float64).reshape(6)
    limits = np.asarray(max_delta, dtype=np.float64).reshape(6)
    out = np.clip(d, -limits, limits)
    return out, [DELTA_AXES[i] for i in np.flatnonzero(out != d)]


def clamp_to_workspace(position: np.ndarray, lo: tuple[float, ...], hi: tuple[float, ...]
                       ) -> tuple[np.ndarray, list[str]]:
    """Clamp a target position into the [lo, hi] box; returns the clamped copy and the axes that were clamped."""
    p = np.asarray(position, dtype=np.float64).reshape(3)
    out = np.clip(p, np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64))
    return out, [TRANSLATION_AXES[i] for i in np.flatnonzero(out != p)]


def sanitize_gripper(value: float, previous: float, binarize: bool = False, threshold: float = 0.5
                     ) -> tuple[float, str]:
    """A gripper command in [0, 1] (1 = open). Non-finite -> `previous`; returns (value, note about any change)."""
    v = float(value)
    if not np.isfinite(v):
        return float(previous), f"gripper command {v} is not finite; keeping {previous:g}"
    note = ""
    if v < 0.0 or v > 1.0:
        note = f"gripper command {v:g} outside [0, 1] clipped"
        v = min(max(v, 0.0), 1.0)
    if binarize:
        v = 0.0 if v < threshold else 1.0
    return v, note


def check_action(action: np.ndarray) -> tuple[np.ndarray | None, str]:
    """Validate a raw 7-D model action; returns (float64[7], "") or (None, reason it cannot be used)."""
    try:
        a = np.asarray(action, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as e:
        return None, f"model action is not numeric ({e})"
    if a.size != 7:
        return None, f"model action has {a.size} values; expected 7 (dx, dy, dz, droll, dpitch, dyaw, gripper)"
    bad = [name for name, v in zip((*DELTA_AXES, "gripper"), a, strict=True) if not np.isfinite(v)]
    if bad:
        return None, f"model action has non-finite values in {', '.join(bad)}: {a.tolist()}"
    return a, ""


class ActionGuard:
    """Turns raw model actions into GuardedSteps, keeping the integrated target position and the last gripper.

    The target position starts at `config.workspace_start` (the policy side cannot measure the arm; the WidowX node
    re-applies the bounds to the real target pose). Call `reset_target()` when the robot is known to be at the start.
    """

    def __init__(self, config: SafetyConfig | None = None, initial_gripper: float = GRIPPER_OPEN) -> None:
        self.config = config or SafetyConfig()
        self.last_gripper = float(initial_gripper)
        self.target_position = np.asarray(self.config.workspace_start, dtype=np.float64).copy()

    def reset_target(self, position: np.ndarray | None = None) -> None:
        start = self.config.workspace_start if position is None else position
        self.target_position = np.asarray(start, dtype=np.float64).reshape(3).copy()

    def hold(self, reason: str) -> GuardedStep:
        """The safe step: no motion, gripper unchanged."""
        return GuardedStep(delta=np.zeros(6), gripper=self.last_gripper, safe_hold=True, reason=reason)

    def check(self, action: np.ndarray) -> GuardedStep:
        a, problem = check_action(action)
        if a is None:
            return self.hold(problem)
        cfg = self.config
        delta, clipped = clip_delta(a[:6], cfg.max_delta)
        notes = []
        if clipped:
            notes.append(f"clipped {', '.join(clipped)} to the per-step limits")
        if cfg.workspace_bounds:
            wanted = self.target_position + delta[:3]
            reached, clamped = clamp_to_workspace(wanted, cfg.workspace_min, cfg.workspace_max)
            if clamped:
                notes.append(f"target {', '.join(clamped)} kept inside the workspace")
                delta[:3] = reached - self.target_position
            self.target_position = reached
        else:
            self.target_position = self.target_position + delta[:3]
        gripper, gripper_note = sanitize_gripper(a[6], self.last_gripper, cfg.binarize_gripper,
                                                 cfg.gripper_threshold)
        if gripper_note:
            notes.append(gripper_note)
        self.last_gripper = gripper
        return GuardedStep(delta=delta, gripper=gripper, reason="; ".join(notes), clipped_axes=clipped)


@dataclass
class WatchdogStatus:
    stale: bool
    age_s: float | None  # age of the newest image; None: no image yet
    warn: bool  # true only on the check where the watchdog first trips (warn once per stale period)
    waited_s: float | None = None  # with no image yet: seconds since the watchdog was started
    frozen: bool = False  # images keep arriving, but with the stamp of an older one (a frozen driver)

    @property
    def reason(self) -> str:
        if not self.stale:
            return ""
        if self.age_s is None:
            waited = f" ({self.waited_s:.1f} s since start)" if self.waited_s is not None else ""
            return f"no camera image received yet{waited}"
        if self.frozen:
            return (f"frozen camera: images keep arriving with the same header stamp for {self.age_s:.2f} s (the "
                    "driver re-sends its last frame)")
        return f"stale camera image: the newest is {self.age_s:.2f} s old"


class StaleImageWatchdog:
    """Decides whether the newest camera image is recent enough to act on; times are monotonic seconds.

    Before the first image every check is stale (there is nothing to act on); it warns once when no image came
    within the timeout of `start()`, and once each time images stop for longer than the timeout.

    With stamps (`image_received(now, stamp_ns)`, stamp_ns > 0), an image that repeats the previous image's stamp is
    not new: a frozen driver re-sending its last frame goes stale like a camera that stopped. `repeats_are_new`
    (lock-step with a simulator, which re-sends the image it waits on) counts every arrival. Unstamped images
    (stamp 0) are judged by arrival only.
    """

    def __init__(self, timeout_s: float, repeats_are_new: bool = False) -> None:
        if not timeout_s > 0:
            raise ValueError(f"image timeout must be positive seconds; got {timeout_s}")
        self.timeout_s = float(timeout_s)
        self.repeats_are_new = repeats_are_new
        self.started_at: float | None = None
        self.last_image_time: float | None = None
        self.last_stamp_ns = 0
        self.repeats = 0  # images that repeated the previous stamp (since the last new one)
        self._tripped = False

    def start(self, now: float) -> None:
        """Forget earlier images and start waiting for one (e.g. when control is activated)."""
        self.started_at = now
        self.last_image_time = None
        self.last_stamp_ns = 0
        self.repeats = 0
        self._tripped = False

    def image_received(self, now: float, stamp_ns: int = 0) -> None:
        """An image arrived at `now` (monotonic s) carrying header stamp `stamp_ns` (0: unstamped)."""
        if stamp_ns and stamp_ns == self.last_stamp_ns and self.last_image_time is not None:
            self.repeats += 1
            if not self.repeats_are_new:
                return  # the same frame again: it is as old as when it first came
        else:
            self.repeats = 0
        self.last_stamp_ns = stamp_ns
        self.last_image_time = now
        self._tripped = False

    def status(self, now: float) -> WatchdogStatus:
        """The state at `now`, without side effects (for diagnostics); warn is always False here."""
        if self.last_image_time is None:
            waited = None if self.started_at is None else now - self.started_at
            return WatchdogStatus(stale=True, age_s=None, warn=False, waited_s=waited)
        age = now - self.last_image_time
        frozen = self.repeats > 0 and not self.repeats_are_new
        return WatchdogStatus(stale=age > self.timeout_s, age_s=age, warn=False, frozen=frozen)

    def check(self, now: float) -> WatchdogStatus:
        """The state at `now` for the control loop: warn is True once per stale period (and once when no image
        came within the timeout of start())."""
        st = self.status(now)
        if self.last_image_time is None:
            st.warn = st.waited_s is not None and st.waited_s > self.timeout_s and not self._tripped
        else:
            st.warn = st.stale and not self._tripped
        self._tripped = self._tripped or st.warn
        return st
