"""Which topics of a ROS 2 bag make a frame, and how they are paired in time: BagTopicsConfig, mirrored key for key
by config/bag_topics.yaml; `refinevla record` records these topics and `refinevla convert --bag` reads them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
ACTION_TYPES = ("refinevla/msg/EndEffectorDelta", "refinevla/msg/Action")
GRIPPER_TYPES = ("std_msgs/msg/Float64", "std_msgs/msg/Float32")
INSTRUCTION_TYPES = ("std_msgs/msg/String",)
STATUS_TYPES = ("refinevla/msg/EpisodeStatus",)


@dataclass
class BagTopicsConfig:
    """Which topics of a bag make a frame, and how they are aligned in time (config/bag_topics.yaml)."""

    image_topic: str = "/camera/image_raw"  # sensor_msgs/Image or sensor_msgs/CompressedImage
    instruction_topic: str = "/refinevla/instruction"  # std_msgs/String
    action_topic: str = "/refinevla/ee_delta"  # refinevla/EndEffectorDelta, or refinevla/Action (has the gripper)
    gripper_topic: str = "/refinevla/gripper"  # std_msgs/Float64, Bridge convention 1 = open, 0 = closed
    episode_status_topic: str = "/refinevla/episode_status"  # optional; "" to ignore
    extra_record_topics: list[str] = field(default_factory=lambda: ["/camera/camera_info"])  # recorded, not converted
    time_source: Literal["bag", "header"] = "bag"  # how an action finds its image: receive times or header stamps
    max_gap_s: float = 1.0  # a pause longer than this between action messages ends an episode
    gripper_slack_s: float = 0.05  # a gripper message up to this long after its action still belongs to it
    max_image_age_s: float = 1.0  # an action whose latest image is older than this is skipped (camera dropped out)
    initial_gripper: float | None = None  # gripper before the first gripper message (None: that is an error)
    default_instruction: str = ""  # used when the bag has no instruction messages at all
    skip_safe_hold: bool = True  # refinevla/Action steps a guard replaced with "no motion" are not demonstrations
    min_episode_frames: int = 2  # shorter episodes are dropped (and counted)
    image_size: list[int] | None = None  # [height, width] to resize to; None keeps the camera's size
    task: str = ""  # Episode.task for every converted episode (EpisodeStatus.task wins when recorded)

    def __post_init__(self) -> None:
        if not self.action_topic or not self.image_topic:
            raise ValueError("action_topic and image_topic must name topics")
        if self.max_gap_s <= 0 or self.max_image_age_s <= 0 or self.gripper_slack_s < 0:
            raise ValueError("max_gap_s and max_image_age_s must be > 0, gripper_slack_s >= 0")
        if self.image_size is not None and (len(self.image_size) != 2 or min(self.image_size) <= 0):
            raise ValueError(f"image_size must be [height, width] with positive values; got {self.image_size}")
        if self.initial_gripper is not None and not 0.0 <= self.initial_gripper <= 1.0:
            raise ValueError(f"initial_gripper must be in [0, 1] (1 = open); got {self.initial_gripper}")
        if self.min_episode_frames < 1:
            raise ValueError("min_episode_frames must be >= 1")

    def record_topics(self) -> list[str]:
        """The topics `refinevla record` subscribes to by default: everything conversion reads, plus extras."""
        topics = [self.image_topic, self.instruction_topic, self.action_topic, self.gripper_topic,
                  self.episode_status_topic, *self.extra_record_topics]
        return list(dict.fromkeys(t for t in topics if t))
