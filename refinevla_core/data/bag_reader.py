"""ROS 2 bags -> Episodes: the real-robot half of the data loop.

A WidowX owner records camera, instruction and end-effector commands with `refinevla record` (or `ros2 bag record`),
and `refinevla convert --bag` turns the bag into the project's episode format. Everything here uses rosbags
(sqlite3 and mcap storage, no ROS install needed), so conversion runs on a training server without ROS.

How a bag becomes episodes (topic names and knobs live in BagTopicsConfig / config/bag_topics.yaml):

- Every message on the action topic (refinevla/msg/EndEffectorDelta, or refinevla/msg/Action which carries the
  gripper too) is one step. Its image is the LATEST camera image at or before the action (no image from the future
  can leak into a frame); its gripper is the latest std_msgs/Float64 on the gripper topic at or before the action
  (plus `gripper_slack_s`, because two publishers of one control step arrive in either order).
- `time_source: bag` pairs by receive time (what the recorder saw); `time_source: header` pairs by header stamps,
  exact for policy output, whose EndEffectorDelta stamp is the stamp of the image it was computed from.
- Episodes end where the instruction text changes, where EpisodeStatus.episode changes (sim bridge recordings), and
  at a pause of more than `max_gap_s` between action messages.
- Non-finite actions raise DataError naming the bag, episode, frame and time; `drop_bad_frames` drops them instead
  and counts them. Steps that cannot make a frame (no instruction or image yet, a stale image, a guard's safe hold)
  are skipped and counted in the report — never silently.

Reading takes two passes (BagEpisodeReader): the first reads the small topics and image times and plans every frame
(refinevla_core.data.bag_plan), so bad actions fail before any image is decoded; the second decodes only the images
the frames use. Opening bags, including ones whose recorder was killed, is refinevla_core.data.bag_storage.open_bag.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from refinevla_core.data.bag_plan import BagReport, EpisodePlanner, PlannedEpisode, read_small_topics
from refinevla_core.data.bag_storage import open_bag
from refinevla_core.data.bag_topics import (
    ACTION_TYPES,
    GRIPPER_TYPES,
    IMAGE_TYPES,
    INSTRUCTION_TYPES,
    STATUS_TYPES,
    BagTopicsConfig,
)
from refinevla_core.data.episode import DataError, Episode
from refinevla_core.data.images import compressed_to_rgb, raw_to_rgb, resize_rgb


def image_msg_to_rgb(msg: Any, msgtype: str) -> np.ndarray:
    """A deserialized sensor_msgs Image / CompressedImage -> HxWx3 uint8 RGB; ImageConversionError (a ValueError)
    says what is wrong."""
    if msgtype.endswith("CompressedImage"):
        return compressed_to_rgb(msg.data, msg.format)
    return raw_to_rgb(msg.encoding, msg.height, msg.width, msg.step, msg.data)


class BagEpisodeReader:
    """Turn one bag into Episodes: `for ep in BagEpisodeReader(path, cfg).episodes(): ...`; `.report` fills as it
    goes. An EpisodeSource (refinevla_core.data.source) for `refinevla convert`."""

    def __init__(self, path: str | Path, config: BagTopicsConfig | None = None, drop_bad_frames: bool = False,
                 typestore: Any | None = None) -> None:
        self.path = Path(path)
        self.config = config or BagTopicsConfig()
        self.drop_bad_frames = drop_bad_frames
        self.typestore = typestore
        self.report = BagReport(bag=str(self.path))

    def expected_episodes(self) -> int | None:
        return None  # known only once the bag has been read

    def source_episodes(self) -> Iterator[list[Episode]]:
        """EpisodeSource: each episode of the bag as a one-element list."""
        for episode in self.episodes():
            yield [episode]

    def episodes(self) -> Iterator[Episode]:
        """Yield the bag's episodes in time order (each validated); fills self.report."""
        with open_bag(self.path, self.typestore) as (reader, recovered):
            self.report.recovered = recovered
            if recovered:
                self.report.warnings.append(
                    "the bag was not closed (recorder killed?): read up to its last flush"
                )
            conns = self._topics(reader)
            messages = read_small_topics(reader, conns, self.path, use_header=self.config.time_source == "header")
            planned = EpisodePlanner(self.path, self.config, messages, self.report, self.drop_bad_frames).plan()
            if planned:
                yield from self._decode(reader, conns["image"], planned)

    def _topics(self, reader: Any) -> dict[str, Any]:
        """role -> the bag's connections of the configured topic (None for a missing optional one); DataError
        names a missing required topic or a wrong message type."""
        cfg = self.config
        by_topic: dict[str, list[Any]] = {}
        for c in reader.connections:
            by_topic.setdefault(c.topic, []).append(c)
        available = ", ".join(f"{t} [{cs[0].msgtype}]" for t, cs in sorted(by_topic.items())) or "none"

        def pick(topic: str, allowed: tuple[str, ...], key: str, required: bool) -> Any | None:
            conns = by_topic.get(topic, []) if topic else []
            if not conns:
                if required:
                    raise DataError(
                        f"bag {self.path} has no {topic!r} topic (config key {key}); its topics: {available}"
                    )
                return None
            types = {c.msgtype for c in conns}
            if len(types) != 1 or next(iter(types)) not in allowed:
                raise DataError(
                    f"bag {self.path}: {topic} has type {sorted(types)}; {key} must be one of {list(allowed)}"
                )
            self.report.messages[topic] = sum(c.msgcount for c in conns)
            return conns

        return {
            "image": pick(cfg.image_topic, IMAGE_TYPES, "image_topic", True),
            "action": pick(cfg.action_topic, ACTION_TYPES, "action_topic", True),
            "gripper": pick(cfg.gripper_topic, GRIPPER_TYPES, "gripper_topic", False),
            "instruction": pick(cfg.instruction_topic, INSTRUCTION_TYPES, "instruction_topic", False),
            "status": pick(cfg.episode_status_topic, STATUS_TYPES, "episode_status_topic", False),
        }

    def _decode(self, reader: Any, image_conns: list[Any], planned: list[PlannedEpisode]) -> Iterator[Episode]:
        """Pass 2: decode the images the planned steps use, in bag order, and yield each episode as soon as all
        its images are in (so a long bag streams instead of sitting in memory)."""
        users_of: dict[int, list[tuple[int, int]]] = {}  # image ordinal -> [(episode, step)]
        for e, ep in enumerate(planned):
            for s, step in enumerate(ep.steps):
                users_of.setdefault(step.image_ordinal, []).append((e, s))
        last_needed = max(users_of)
        images: dict[tuple[int, int], np.ndarray] = {}
        remaining = [len(ep.steps) for ep in planned]
        next_out = 0
        for ordinal, (conn, _t, raw) in enumerate(reader.messages(connections=image_conns)):
            if ordinal > last_needed:
                break
            users = users_of.get(ordinal)
            if not users:
                continue
            rgb = self._decoded(reader.deserialize(raw, conn.msgtype), conn.msgtype, users[0])
            for e, s in users:
                if rgb is None:
                    planned[e].steps[s].bad_image = True
                    self.report.dropped_bad_frames += 1
                else:
                    images[(e, s)] = rgb
                remaining[e] -= 1
            while next_out < len(planned) and remaining[next_out] == 0:
                episode = self._assemble(next_out, planned[next_out], images)
                if episode is not None:
                    yield episode
                next_out += 1
        if next_out < len(planned):
            raise DataError(f"bag {self.path}: image messages ended early (is the storage file truncated?)")

    def _decoded(self, msg: Any, msgtype: str, first_user: tuple[int, int]) -> np.ndarray | None:
        """The image as RGB at the configured size; None for an undecodable one when bad frames are dropped."""
        try:
            return resize_rgb(image_msg_to_rgb(msg, msgtype), self.config.image_size)
        except ValueError as e:
            if self.drop_bad_frames:
                return None
            e0, s0 = first_user
            raise DataError(
                f"bag {self.path} episode {e0} frame {s0}: {self.config.image_topic}: {e}; pass --drop-bad-frames "
                "to drop frames with undecodable images"
            ) from e

    def _assemble(self, e: int, ep: PlannedEpisode, images: dict[tuple[int, int], np.ndarray]) -> Episode | None:
        keep = [s for s, step in enumerate(ep.steps) if not step.bad_image]
        frames = [images.pop((e, s)) for s in keep]
        if len(keep) < self.config.min_episode_frames:
            self.report.dropped_short_episodes += 1
            return None
        shapes = {f.shape for f in frames}
        if len(shapes) != 1:
            first = frames[0].shape
            odd = next(i for i, f in enumerate(frames) if f.shape != first)
            raise DataError(
                f"bag {self.path} episode {e} frame {odd}: image size {frames[odd].shape[:2]} differs from "
                f"{first[:2]} earlier in the episode; set image_size: [height, width] in the bag config to resize"
            )
        steps = [ep.steps[s] for s in keep]
        episode = Episode(
            images=np.stack(frames), actions=np.stack([s.action for s in steps]), instruction=ep.instruction,
            task=ep.task or self.config.task, success=ep.success, seed=ep.seed,
            metadata={
                "source": "rosbag", "bag": str(self.path), "bag_episode": e,
                "start_time_ns": steps[0].bag_time_ns, "end_time_ns": steps[-1].bag_time_ns,
                "image_topic": self.config.image_topic, "action_topic": self.config.action_topic,
                "time_source": self.config.time_source,
            },
        )
        episode.validate(where=f"bag {self.path} episode {e}")
        self.report.episodes += 1
        self.report.frames += len(episode)
        return episode


def read_bag(path: str | Path, config: BagTopicsConfig | None = None, drop_bad_frames: bool = False
             ) -> tuple[list[Episode], BagReport]:
    """All episodes of a bag in memory (small bags, tests); use BagEpisodeReader to stream large ones."""
    reader = BagEpisodeReader(path, config, drop_bad_frames)
    episodes = list(reader.episodes())
    return episodes, reader.report
