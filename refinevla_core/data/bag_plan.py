"""Pass 1 of reading a bag: pair every action message with its instruction, episode status, gripper and image, and
plan the episodes before any image is decoded, so a bad action fails fast and pass 2 decodes only the images used.

The pairing rules are in the docstring of refinevla_core.data.bag_reader; every step that cannot make a frame is
counted in the BagReport under the reason it was skipped.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from refinevla_core.data.bag_topics import BagTopicsConfig
from refinevla_core.data.episode import DataError
from refinevla_core.stamps import stamp_to_ns

NS_PER_S = 1e9


@dataclass
class BagReport:
    """What a conversion read, kept, skipped and why: printed by `refinevla convert`, stored in the dataset meta."""

    bag: str = ""
    recovered: bool = False
    messages: dict[str, int] = field(default_factory=dict)
    action_type: str = ""
    actions: int = 0
    frames: int = 0
    episodes: int = 0
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> count
    dropped_bad_frames: int = 0
    dropped_short_episodes: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "bag": self.bag, "recovered": self.recovered, "messages": dict(self.messages),
            "action_type": self.action_type, "actions": self.actions, "frames": self.frames,
            "episodes": self.episodes, "skipped": dict(self.skipped), "dropped_bad_frames": self.dropped_bad_frames,
            "dropped_short_episodes": self.dropped_short_episodes, "warnings": list(self.warnings),
        }


@dataclass
class PlannedStep:
    action: np.ndarray  # float32[7]
    image_ordinal: int  # which image message of the bag (in bag order) is this step's frame
    bag_time_ns: int
    bad_image: bool = False  # set by pass 2 when the image cannot be decoded and bad frames are dropped


@dataclass
class PlannedEpisode:
    instruction: str
    status_episode: int | None  # EpisodeStatus.episode while it was recorded (sim bridge recordings)
    steps: list[PlannedStep] = field(default_factory=list)
    success: bool | None = None
    seed: int | None = None
    task: str = ""


@dataclass
class BagMessages:
    """What pass 1 reads, in bag order: the small topics in full, the image topic as pairing times only."""

    image_times: list[int] = field(default_factory=list)
    instructions: list[tuple[int, str]] = field(default_factory=list)
    grippers: list[tuple[int, float]] = field(default_factory=list)
    statuses: list[tuple[int, Any]] = field(default_factory=list)
    actions: list[tuple[int, int, Any]] = field(default_factory=list)  # (bag time, pairing time, message)
    action_type: str = ""
    empty_instructions: int = 0


def read_small_topics(reader: Any, conns: dict[str, Any], bag: Path, use_header: bool) -> BagMessages:
    """Deserialize every message of the chosen connections (`conns`: role -> connections or None) except image
    payloads; `use_header` pairs actions and images by header stamps instead of receive times."""
    role_of = {cs[0].topic: role for role, cs in conns.items() if cs}
    wanted = [c for cs in conns.values() if cs for c in cs]
    out = BagMessages()
    for conn, t, raw in reader.messages(connections=wanted):
        role = role_of[conn.topic]
        msg = reader.deserialize(raw, conn.msgtype)
        if role == "image":
            out.image_times.append(header_time(msg, conn.topic, bag) if use_header else t)
        elif role == "action":
            out.actions.append((t, header_time(msg, conn.topic, bag) if use_header else t, msg))
            out.action_type = conn.msgtype
        elif role == "gripper":
            out.grippers.append((t, float(msg.data)))
        elif role == "instruction":
            text = " ".join(str(msg.data).split())
            if text:
                out.instructions.append((t, text))
            else:
                out.empty_instructions += 1
        elif role == "status":
            out.statuses.append((t, msg))
    return out


def header_time(msg: Any, topic: str, bag: Path) -> int:
    """The header stamp of `msg` in ns (time_source: header); an unstamped message cannot be paired."""
    t = stamp_to_ns(msg.header.stamp)
    if t == 0:
        raise DataError(
            f"bag {bag}: a {topic} message has a zero header stamp, so time_source: header cannot pair it; "
            "stamp the messages, or use time_source: bag"
        )
    return t


class _Latest:
    """A time-ordered series, asked for "the latest value at or before time t"."""

    def __init__(self, series: list[tuple[int, Any]]) -> None:
        self.times = [t for t, _ in series]
        self.values = [v for _, v in series]

    def index(self, t: int) -> int:
        """Position of the latest entry at or before t; -1 when there is none yet."""
        return bisect.bisect_right(self.times, t) - 1


class EpisodePlanner:
    """Turn the action messages of a bag (BagMessages) into PlannedEpisodes, counting skips in `report`."""

    def __init__(self, bag: Path, config: BagTopicsConfig, messages: BagMessages, report: BagReport,
                 drop_bad_frames: bool) -> None:
        self.bag = bag
        self.config = config
        self.messages = messages
        self.report = report
        self.drop_bad_frames = drop_bad_frames
        if messages.empty_instructions:
            report.warnings.append(f"{messages.empty_instructions} empty instruction message(s) ignored")
        report.actions = len(messages.actions)
        if messages.actions:
            report.action_type = messages.action_type
        self._instructions = _Latest(self._instructions_or_default(messages.instructions))
        self._statuses = _Latest(messages.statuses)
        self._grippers = _Latest(messages.grippers)
        # image times in time order (header stamps need not arrive in order), and each one's position in the bag
        self._image_order = sorted(range(len(messages.image_times)), key=messages.image_times.__getitem__)
        self._image_times = [messages.image_times[i] for i in self._image_order]

    def plan(self) -> list[PlannedEpisode]:
        """The bag's episodes, each with the steps that make frames; too-short episodes are dropped (counted)."""
        max_gap = int(self.config.max_gap_s * NS_PER_S)
        episodes: list[PlannedEpisode] = []
        prev_t: int | None = None
        for n, (t, t_pair, msg) in enumerate(self.messages.actions):
            gap = prev_t is not None and t - prev_t > max_gap
            prev_t = t
            if self._episode_at(t, gap, episodes) is not None:
                self._add_step(episodes, n, (t, t_pair, msg))
        kept = self._long_enough(episodes)
        if self.messages.statuses:
            _mark_success(kept, [m for _, m in self.messages.statuses])
        return kept

    def _instructions_or_default(self, instructions: list[tuple[int, str]]) -> list[tuple[int, str]]:
        cfg = self.config
        if not instructions and cfg.default_instruction:
            instructions = [(-1, " ".join(cfg.default_instruction.split()))]
        if not instructions:
            raise DataError(
                f"bag {self.bag} has no instruction messages on {cfg.instruction_topic!r}; record the instruction "
                "topic, or set default_instruction in the bag config (e.g. --set default_instruction='put the "
                "spoon on the towel')"
            )
        return instructions

    def _episode_at(self, t: int, gap: bool, episodes: list[PlannedEpisode]) -> PlannedEpisode | None:
        """The episode an action at bag time t belongs to (a new one after a pause, or when the instruction or
        EpisodeStatus.episode changes); None (counted) before the first instruction."""
        i = self._instructions.index(t)
        if i < 0:
            self.report.skipped["before_first_instruction"] += 1
            return None
        instruction = self._instructions.values[i]
        j = self._statuses.index(t)
        status = self._statuses.values[j] if j >= 0 else None
        status_episode = int(status.episode) if status is not None else None
        current = episodes[-1] if episodes else None
        if current is None or gap or instruction != current.instruction or status_episode != current.status_episode:
            current = PlannedEpisode(instruction, status_episode)
            episodes.append(current)
        if status is not None:
            current.seed = int(status.seed)
            current.task = str(status.task)
        return current

    def _add_step(self, episodes: list[PlannedEpisode], n: int, message: tuple[int, int, Any]) -> None:
        """Append action message `n` ((bag time, pairing time, message)) to the last episode unless it is a safe
        hold, a dropped bad action, or has no usable image (each counted); bad actions raise DataError otherwise."""
        t, t_pair, msg = message
        episode = episodes[-1]
        if getattr(msg, "safe_hold", False) and self.config.skip_safe_hold:
            self.report.skipped["safe_hold"] += 1
            return
        action = self._action_vector(n, t, msg)
        where = (f"bag {self.bag} episode {len(episodes) - 1} frame {len(episode.steps)} "
                 f"(action message {n}, t={t / NS_PER_S:.3f} s)")
        if not self._action_is_usable(action, where):
            return
        image = self._image_at(t_pair)
        if image is not None:
            episode.steps.append(PlannedStep(action.astype(np.float32), image, t))

    def _action_vector(self, n: int, t: int, msg: Any) -> np.ndarray:
        """(dx, dy, dz, droll, dpitch, dyaw, gripper) float64 of an EndEffectorDelta or Action message; the gripper
        of a bare delta is the latest gripper message up to gripper_slack_s after it."""
        cfg = self.config
        delta = msg.delta if hasattr(msg, "delta") else msg
        if hasattr(msg, "gripper"):
            gripper = float(msg.gripper)
        else:
            g = self._grippers.index(t + int(cfg.gripper_slack_s * NS_PER_S))
            if g >= 0:
                gripper = self._grippers.values[g]
            elif cfg.initial_gripper is not None:
                gripper = cfg.initial_gripper
            else:
                raise DataError(
                    f"bag {self.bag} action {n} (t={t / NS_PER_S:.3f} s) has no gripper value: no "
                    f"{cfg.gripper_topic!r} message before it; record the gripper topic, or set initial_gripper "
                    "in the bag config (1.0 = open, 0.0 = closed; e.g. --set initial_gripper=1.0)"
                )
        return np.array([delta.x, delta.y, delta.z, delta.roll, delta.pitch, delta.yaw, gripper], np.float64)

    def _action_is_usable(self, action: np.ndarray, where: str) -> bool:
        """False for a non-finite action when bad frames are dropped (counted); DataError for one that is not
        dropped and for a gripper outside Bridge's [0, 1]."""
        if not np.all(np.isfinite(action)):
            if self.drop_bad_frames:
                self.report.dropped_bad_frames += 1
                return False
            raise DataError(
                f"{where}: non-finite action {action.tolist()}; fix the publisher, or pass --drop-bad-frames to "
                "drop such frames (they are counted in the summary)"
            )
        gripper = float(action[6])
        if not -1e-6 <= gripper <= 1 + 1e-6:
            raise DataError(
                f"{where}: gripper {gripper} is outside [0, 1]; {self.config.gripper_topic} must use the Bridge "
                "convention (1 = open, 0 = closed). SimplerEnv's -1..+1 converts with g = (g_sim + 1) / 2"
            )
        return True

    def _image_at(self, t_pair: int) -> int | None:
        """Ordinal of the latest image at or before pairing time t_pair; None (counted) when there is none yet or
        it is older than max_image_age_s."""
        k = bisect.bisect_right(self._image_times, t_pair) - 1
        if k < 0:
            self.report.skipped["before_first_image"] += 1
            return None
        if t_pair - self._image_times[k] > int(self.config.max_image_age_s * NS_PER_S):
            self.report.skipped["stale_image"] += 1
            return None
        return self._image_order[k]

    def _long_enough(self, episodes: list[PlannedEpisode]) -> list[PlannedEpisode]:
        kept = []
        for ep in episodes:
            if not ep.steps:
                continue
            if len(ep.steps) < self.config.min_episode_frames:
                self.report.dropped_short_episodes += 1
                continue
            kept.append(ep)
        return kept


def _mark_success(episodes: list[PlannedEpisode], statuses: list[Any]) -> None:
    """An episode succeeded when any EpisodeStatus of its episode number reported ever_success."""
    for ep in episodes:
        seen = [s for s in statuses if int(s.episode) == ep.status_episode]
        ep.success = any(bool(s.ever_success) for s in seen) if seen else None
