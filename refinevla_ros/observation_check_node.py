"""observation_check_node: checks the camera + instruction wiring of a robot before any model is loaded.

It decodes every camera image exactly as the policy node will (same conversions, same QoS) and answers with a
refinevla/msg/Rationale describing what it received, so `ros2 topic echo /refinevla/observation_check` tells a user
whether the camera encoding, size, rate and instruction reach the policy side. It never commands motion.
"""

from __future__ import annotations

import sys
import time

from rclpy.node import Node
from sensor_msgs.msg import Image
from std_msgs.msg import String

from refinevla.msg import Rationale as RationaleMsg
from refinevla_core.rationale import Rationale
from refinevla_ros.conversions import ImageConversionError, decode_text, image_to_rgb, rationale_to_msg
from refinevla_ros.run import run_node
from refinevla_ros.topics import (
    CAMERA_QOS,
    IMAGE_TOPIC,
    INSTRUCTION_QOS,
    INSTRUCTION_TOPIC,
    OBSERVATION_CHECK_TOPIC,
)


class ObservationCheckNode(Node):
    def __init__(self) -> None:
        super().__init__("observation_check")
        self.declare_parameter("max_instruction_chars", 2000)
        self.instruction = ""
        self.frames = 0
        self.first_frame_time: float | None = None
        self.report_pub = self.create_publisher(RationaleMsg, OBSERVATION_CHECK_TOPIC, 10)
        self.create_subscription(String, INSTRUCTION_TOPIC, self.on_instruction, INSTRUCTION_QOS)
        self.create_subscription(Image, IMAGE_TOPIC, self.on_image, CAMERA_QOS)

    def on_instruction(self, msg: String) -> None:
        try:
            self.instruction = decode_text(msg.data, self.get_parameter("max_instruction_chars").value)
        except ValueError as e:
            self.get_logger().warning(f"ignoring instruction: {e}")
            return
        self.get_logger().info(f"instruction: {self.instruction!r}")

    def on_image(self, msg: Image) -> None:
        try:
            rgb = image_to_rgb(msg)
        except ImageConversionError as e:
            self.get_logger().warning(str(e), throttle_duration_sec=5.0)
            return
        now = time.monotonic()
        self.frames += 1
        if self.first_frame_time is None:
            self.first_frame_time = now
        rate = (self.frames - 1) / (now - self.first_frame_time) if self.frames > 1 else 0.0
        mean = rgb.reshape(-1, 3).mean(axis=0)
        report = Rationale(
            observation=f"{msg.encoding} image {msg.width}x{msg.height}, mean RGB "
            f"({mean[0]:.0f}, {mean[1]:.0f}, {mean[2]:.0f}), frame {self.frames} at {rate:.1f} Hz",
            situation_analysis=(
                f"instruction: {self.instruction}" if self.instruction else "no instruction received yet"
            ),
            spatial_reasoning="no model is loaded: nothing is inferred from the image",
            task_planning="hold position (this node never commands motion)",
        )
        self.report_pub.publish(rationale_to_msg(report, header=msg.header, step=self.frames, rid=self.frames))


def main(args: list[str] | None = None) -> int:
    return run_node(ObservationCheckNode, "observation_check", args=args)


if __name__ == "__main__":
    sys.exit(main())
