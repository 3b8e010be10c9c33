"""The real robot: camera -> policy_node -> widowx_node -> Interbotix WidowX 250s (dry run unless dry_run:=false).

    ros2 launch interbotix_xsarm_control xsarm_control.launch.py robot_model:=wx250s   # the arm driver, first
    ros2 launch refinevla widowx.launch.py checkpoint:=/path/to/checkpoint camera_topic:=/camera/color/image_raw
    ros2 topic pub --once /refinevla/instruction std_msgs/msg/String "{data: 'put the spoon on the towel'}"

start_arm_driver:=true includes the Interbotix driver launch here instead; start_camera:=true starts a v4l2 camera.
Both need their packages installed; the policy and widowx nodes are this package's executables (scripts/).
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription
from launch.conditions import IfCondition
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

ARGUMENTS = [
    ("checkpoint", "", "checkpoint folder written by `refinevla train`"),
    ("policy_factory", "", "or package.module:callable returning an object with predict/reset"),
    ("device", "cpu", "torch device for the policy (cpu, cuda, cuda:1)"),
    ("dry_run", "true", "true: solve IK and log, never move the arm"),
    ("robot_model", "wx250s", "Interbotix robot model"),
    ("robot_name", "wx250s", "namespace of the xs_sdk driver"),
    ("camera_topic", "/camera/image_raw", "sensor_msgs/Image topic of the 3rd-person camera"),
    ("image_transport", "raw", "raw or compressed (<camera_topic>/compressed)"),
    ("control_rate_hz", "5.0", "policy steps per second (Bridge: 5)"),
    ("start_camera", "false", "start v4l2_camera_node publishing camera_topic"),
    ("video_device", "/dev/video0", "the camera device for start_camera"),
    ("start_arm_driver", "false", "include interbotix_xsarm_control's xsarm_control.launch.py"),
]


def generate_launch_description() -> LaunchDescription:
    arg = LaunchConfiguration
    camera_topic = arg("camera_topic")
    policy = Node(
        package="refinevla",
        executable="policy_node",
        name="policy_node",
        output="screen",
        parameters=[
            PathJoinSubstitution([FindPackageShare("refinevla"), "config", "policy.yaml"]),
            {
                "checkpoint": ParameterValue(arg("checkpoint"), value_type=str),
                "policy_factory": ParameterValue(arg("policy_factory"), value_type=str),
                "device": ParameterValue(arg("device"), value_type=str),
                "image_transport": ParameterValue(arg("image_transport"), value_type=str),
                "control_rate_hz": ParameterValue(arg("control_rate_hz"), value_type=float),
                "delta_frame_id": [arg("robot_name"), "/base_link"],
            },
        ],
        remappings=[
            ("/camera/image_raw", camera_topic),
            ("/camera/image_raw/compressed", [camera_topic, "/compressed"]),
        ],
    )
    widowx = Node(
        package="refinevla",
        executable="widowx_node",
        name="widowx_node",
        output="screen",
        parameters=[
            PathJoinSubstitution([FindPackageShare("refinevla"), "config", "widowx.yaml"]),
            {
                "dry_run": ParameterValue(arg("dry_run"), value_type=bool),
                "robot_model": ParameterValue(arg("robot_model"), value_type=str),
                "robot_name": ParameterValue(arg("robot_name"), value_type=str),
            },
        ],
    )
    camera = Node(
        package="v4l2_camera",
        executable="v4l2_camera_node",
        name="camera",
        condition=IfCondition(arg("start_camera")),
        parameters=[{"video_device": ParameterValue(arg("video_device"), value_type=str)}],
        remappings=[("image_raw", camera_topic)],
    )
    arm_driver = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(
            PathJoinSubstitution([FindPackageShare("interbotix_xsarm_control"), "launch", "xsarm_control.launch.py"])
        ),
        launch_arguments={"robot_model": arg("robot_model"), "robot_name": arg("robot_name"),
                          "use_rviz": "false"}.items(),
        condition=IfCondition(arg("start_arm_driver")),
    )
    declared = [DeclareLaunchArgument(name, default_value=default, description=text)
                for name, default, text in ARGUMENTS]
    return LaunchDescription([*declared, arm_driver, camera, policy, widowx])
