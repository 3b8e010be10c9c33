"""The simulated robot: sim_bridge_node (ManiSkill3 camera out, EE deltas in) + policy_node, for regression tests.

    ros2 launch refinevla sim.launch.py checkpoint:=/path/to/checkpoint task:=PushCube-v1
    ros2 topic echo /refinevla/episode_status

Lock-step by default: the bridge steps once per action computed from its current image, and the policy runs one
step per new image (control_rate_hz:=0.0), so results do not depend on the machine's speed.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

ARGUMENTS = [
    ("checkpoint", "", "checkpoint folder written by `refinevla train`"),
    ("policy_factory", "", "or package.module:callable returning an object with predict/reset"),
    ("device", "cpu", "torch device for the policy"),
    ("task", "PushCube-v1", "simulated task (refinevla_core.sim.backend.TASKS)"),
    ("first_seed", "0", "seed of the first episode"),
    ("image_size", "112", "square camera image size in pixels"),
    ("step_mode", "lockstep", "lockstep or control_rate (real-time, control_hz)"),
    ("control_rate_hz", "0.0", "policy steps per second; 0.0 = one per new image (lock-step)"),
    ("image_timeout_s", "60.0", "simulated time stands still while the policy thinks: a long watchdog"),
    ("auto_reset", "true", "start the next episode when one is done"),
    ("action_timeout_s", "0.0", "bridge: hold after this long without an action (0.0: wait; control_rate needs > 0)"),
]


def generate_launch_description() -> LaunchDescription:
    arg = LaunchConfiguration
    sim_bridge = Node(
        package="refinevla",
        executable="sim_bridge_node",
        name="sim_bridge",
        output="screen",
        parameters=[{
            "sim.task": ParameterValue(arg("task"), value_type=str),
            "sim.image_size": ParameterValue(arg("image_size"), value_type=int),
            "first_seed": ParameterValue(arg("first_seed"), value_type=int),
            "step_mode": ParameterValue(arg("step_mode"), value_type=str),
            "auto_reset": ParameterValue(arg("auto_reset"), value_type=bool),
            "action_timeout_s": ParameterValue(arg("action_timeout_s"), value_type=float),
        }],
    )
    policy = Node(
        package="refinevla",
        executable="policy_node",
        name="policy_node",
        output="screen",
        parameters=[
            PathJoinSubstitution([FindPackageShare("refinevla"), "config", "policy.yaml"]),
            PathJoinSubstitution([FindPackageShare("refinevla"), "config", "policy_sim.yaml"]),
            {
                "checkpoint": ParameterValue(arg("checkpoint"), value_type=str),
                "policy_factory": ParameterValue(arg("policy_factory"), value_type=str),
                "device": ParameterValue(arg("device"), value_type=str),
                "control_rate_hz": ParameterValue(arg("control_rate_hz"), value_type=float),
                "image_timeout_s": ParameterValue(arg("image_timeout_s"), value_type=float),
                "delta_frame_id": "world",  # the sim bridge's world_frame_id: ManiSkill base axes = world
            },
        ],
    )
    declared = [DeclareLaunchArgument(name, default_value=default, description=text)
                for name, default, text in ARGUMENTS]
    return LaunchDescription([*declared, sim_bridge, policy])
