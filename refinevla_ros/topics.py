"""Topic and service names and QoS profiles of the ReFineVLA graph, in one place so every node, bench and test
agrees on them (a remapping in a launch file changes the name for one node; these are the defaults).

QoS, and why:
- instructions: reliable + transient local, depth 1 — a `ros2 topic pub --once` sent before the policy node is up
  still arrives, and a late joiner gets the current instruction, not a history.
- commands (EE deltas, gripper, Action, rationales): reliable, depth 10 — a lost command is a lost step.
- episode status / simulator state: reliable + transient local — an evaluator that joins late sees the last one.
- camera: the sensor-data profile (best effort, keep last) — a stale frame is worth nothing; latest wins.
  RELIABLE_CAMERA_QOS is a camera driver that publishes reliably (many do; benchmarks use it to lose no frame).
- MONITOR_QOS: a bench or an evaluator listening to every command: reliable with a deep queue, so a busy listener
  loses nothing.
"""

from __future__ import annotations

from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data

IMAGE_TOPIC = "/camera/image_raw"
COMPRESSED_IMAGE_TOPIC = IMAGE_TOPIC + "/compressed"  # image_transport's naming
CAMERA_INFO_TOPIC = "/camera/camera_info"
INSTRUCTION_TOPIC = "/refinevla/instruction"
EE_DELTA_TOPIC = "/refinevla/ee_delta"
GRIPPER_TOPIC = "/refinevla/gripper"
RATIONALE_TOPIC = "/refinevla/rationale"
RATIONALE_STRUCTURED_TOPIC = "/refinevla/rationale_structured"
ACTION_TOPIC = "/refinevla/action"
ATTENTION_TOPIC = "/refinevla/attention_overlay"
OBSERVATION_CHECK_TOPIC = "/refinevla/observation_check"
STATUS_TOPIC = "/refinevla/episode_status"
PRIVILEGED_STATE_TOPIC = "/refinevla/sim/privileged_state"
DIAGNOSTICS_TOPIC = "/diagnostics"
RESET_SERVICE = "/refinevla/reset_episode"
NEXT_TASK_SERVICE = "/refinevla/next_task"

INSTRUCTION_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
COMMAND_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
LATCHED_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
CAMERA_QOS = qos_profile_sensor_data
RELIABLE_CAMERA_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
MONITOR_QOS = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
