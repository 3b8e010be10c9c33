"""launch/*.launch.py checked without `launch` (not installable from PyPI): each file's AST against what the package
installs — executables in scripts/ (CMakeLists installs them to lib/refinevla), parameter files in config/ valid for
the node's config dataclass, remappings from topics the node really uses, every launch argument declared. The
parameter files are also loaded by rcl itself (--params-file) in real node processes.

With a system ROS 2 (launch + launch_ros importable, refinevla built with colcon), test_launch_system.py runs them.
"""

from __future__ import annotations

import ast
import importlib
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from refinevla_core.config import ConfigError, from_dict
from refinevla_ros.params import _flat_defaults
from test.ros.rosutil import ROOT, node_process

LAUNCH_FILES = sorted((ROOT / "launch").glob("*.launch.py"))
# executable -> (module defining its parameters' dataclass, class name, node module for topic constants)
NODE_CONFIGS = {
    "policy_node": ("refinevla_ros.policy_node", "PolicyNodeConfig", "refinevla_ros.policy_node"),
    "widowx_node": ("refinevla_ros.widowx_node", "WidowXNodeConfig", "refinevla_ros.widowx_node"),
    "sim_bridge_node": ("refinevla_core.sim.config", "SimBridgeConfig", "refinevla_ros.sim_bridge_node"),
}


def _name(func: ast.expr) -> str:
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def _const(node: ast.expr) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None


class LaunchFile:
    """What a launch file asks for, read from its syntax tree."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tree = ast.parse(path.read_text(), filename=str(path))
        self.calls = [n for n in ast.walk(self.tree) if isinstance(n, ast.Call)]
        self.nodes = [{k.arg: k.value for k in c.keywords} for c in self.calls if _name(c.func) == "Node"]
        self.declared = self._declared_arguments()
        self.used_arguments = {_const(c.args[0]) for c in self.calls
                               if _name(c.func) in ("arg", "LaunchConfiguration") and c.args}

    def _declared_arguments(self) -> set[str]:
        names = {_const(c.args[0]) for c in self.calls if _name(c.func) == "DeclareLaunchArgument" and c.args
                 and _const(c.args[0])}
        for stmt in self.tree.body:  # ARGUMENTS = [(name, default, description), ...] turned into declarations
            if isinstance(stmt, ast.Assign) and any(getattr(t, "id", "") == "ARGUMENTS" for t in stmt.targets):
                names |= {row[0] for row in _const(stmt.value)}
        return names

    def parameter_files(self, node: dict) -> list[str]:
        files = []
        for item in getattr(node.get("parameters"), "elts", []):
            if isinstance(item, ast.Call) and _name(item.func) == "PathJoinSubstitution":
                parts = [_const(e) for e in item.args[0].elts]
                files.append("/".join(p for p in parts if isinstance(p, str)))
        return files

    @staticmethod
    def inline_parameters(node: dict) -> dict[str, ast.expr]:
        out = {}
        for item in getattr(node.get("parameters"), "elts", []):
            if isinstance(item, ast.Dict):
                out.update({_const(k): v for k, v in zip(item.keys, item.values, strict=True)})
        return out


def refinevla_nodes(launch: LaunchFile) -> list[dict]:
    return [n for n in launch.nodes if _const(n["package"]) == "refinevla"]


def config_class(executable: str) -> type:
    module, cls, _ = NODE_CONFIGS[executable]
    return getattr(importlib.import_module(module), cls)


def flatten(params: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in params.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dotted, v in flat.items():
        *parents, leaf = dotted.split(".")
        target = out
        for p in parents:
            target = target.setdefault(p, {})
        target[leaf] = v
    return out


def check_ros_types(flat: dict[str, Any], defaults: dict[str, Any], where: str) -> None:
    """rcl types parameters from the YAML scalar: 5 is an integer and fails a parameter declared as 5.0."""
    for key, value in flat.items():
        default = defaults[key]
        if isinstance(default, list):
            assert isinstance(value, list), f"{where}: {key} must be a list"
            assert all(type(v) is type(default[0]) for v in value), \
                f"{where}: {key} = {value}: write every element as a {type(default[0]).__name__}"
        else:
            assert type(value) is type(default), \
                f"{where}: {key} = {value!r} is a {type(value).__name__}; the node declares a {type(default).__name__}"


def test_there_are_launch_files_for_the_robot_and_the_simulator():
    assert {p.name for p in LAUNCH_FILES} >= {"widowx.launch.py", "sim.launch.py"}


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=lambda p: p.name)
def test_launch_file_uses_the_standard_api_and_declares_its_arguments(path):
    launch = LaunchFile(path)
    functions = [s.name for s in launch.tree.body if isinstance(s, ast.FunctionDef)]
    assert "generate_launch_description" in functions
    imported = {s.module.split(".")[0] for s in ast.walk(launch.tree) if isinstance(s, ast.ImportFrom)}
    assert imported <= {"launch", "launch_ros", "__future__"}, imported
    assert launch.used_arguments <= launch.declared, f"undeclared: {launch.used_arguments - launch.declared}"
    assert refinevla_nodes(launch), "starts at least one refinevla node"
    for node in launch.nodes:
        if _const(node["package"]) != "refinevla":  # a driver from another package: only on request
            assert "condition" in node, f"{_const(node['executable'])} from {_const(node['package'])} is optional"


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=lambda p: p.name)
def test_executables_are_installed_scripts(path):
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert 'GLOB NODE_SCRIPTS "${CMAKE_CURRENT_SOURCE_DIR}/scripts/*"' in cmake
    assert "install(PROGRAMS ${NODE_SCRIPTS} DESTINATION lib/${PROJECT_NAME})" in cmake
    for node in refinevla_nodes(LaunchFile(path)):
        exe = _const(node["executable"])
        script = ROOT / "scripts" / exe
        assert script.is_file() and os.access(script, os.X_OK), f"{exe} is not an executable in scripts/"
        module = NODE_CONFIGS[exe][2]
        assert f"from {module} import main" in script.read_text()


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=lambda p: p.name)
def test_parameters_fit_the_node_config(path):
    launch = LaunchFile(path)
    for node in refinevla_nodes(launch):
        exe, name = _const(node["executable"]), _const(node["name"])
        cls = config_class(exe)
        defaults = _flat_defaults(cls)
        for rel in launch.parameter_files(node):
            file = ROOT / rel
            assert file.is_file(), f"{path.name} passes {rel}, which is not in the package"
            assert "install(DIRECTORY ${dir} DESTINATION share/${PROJECT_NAME})" in (ROOT / "CMakeLists.txt"
                                                                                     ).read_text()
            data = yaml.safe_load(file.read_text())
            assert set(data) <= {name, "/**"}, f"{rel} has sections {set(data)}; the node is named {name}"
            flat = flatten(data[name]["ros__parameters"])
            unknown = set(flat) - set(defaults)
            assert not unknown, f"{rel}: unknown parameters {unknown}"
            check_ros_types(flat, defaults, rel)
            from_dict(cls, nest(flat), where=rel)  # raises ConfigError on a bad value
        for key, value in launch.inline_parameters(node).items():
            assert key in defaults, f"{path.name}: {exe} has no parameter {key}"
            if isinstance(value, ast.Call) and _name(value.func) == "ParameterValue":
                value_type = next(k.value.id for k in value.keywords if k.arg == "value_type")
                assert value_type == type(defaults[key]).__name__, f"{path.name}: {key} is a {value_type}"
            elif _const(value) is not None:
                check_ros_types({key: _const(value)}, defaults, path.name)


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=lambda p: p.name)
def test_remappings_start_from_topics_the_node_uses(path):
    launch = LaunchFile(path)
    for node in refinevla_nodes(launch):
        exe = _const(node["executable"])
        module = importlib.import_module(NODE_CONFIGS[exe][2])
        topics = {v for k, v in vars(module).items() if k.endswith("_TOPIC") and isinstance(v, str)}
        for pair in getattr(node.get("remappings"), "elts", []):
            source, target = pair.elts
            assert _const(source) in topics, f"{path.name}: {exe} does not use {_const(source)}"
            names = {_const(c.args[0]) for c in ast.walk(target) if isinstance(c, ast.Call)}
            assert names <= launch.declared, f"{path.name}: remapping target uses undeclared {names}"


def test_the_checks_above_can_fail(tmp_path):
    """A launch file with a typo'd executable, an unknown parameter and an int for a float is caught."""
    bad = tmp_path / "bad.launch.py"
    bad.write_text(
        "from launch import LaunchDescription\nfrom launch_ros.actions import Node\n"
        "def generate_launch_description():\n"
        "    return LaunchDescription([Node(package='refinevla', executable='policy_nod', name='policy_node',\n"
        "        parameters=[{'control_rate': 5}], remappings=[('/camera/raw', '/x')])])\n")
    launch = LaunchFile(bad)
    with pytest.raises(KeyError):
        config_class(_const(launch.nodes[0]["executable"]))
    defaults = _flat_defaults(config_class("policy_node"))
    assert "control_rate" not in defaults
    with pytest.raises(AssertionError, match="write every element as a float"):
        check_ros_types({"safety.max_delta": [1, 1, 1, 1, 1, 1]}, defaults, "x")
    with pytest.raises(AssertionError, match="declares a float"):
        check_ros_types({"control_rate_hz": 5}, defaults, "x")
    with pytest.raises(ConfigError, match="rationale_mode"):
        from_dict(config_class("policy_node"), {"rationale_mode": "sometimes"})
    from refinevla_ros import policy_node

    source = _const(launch.nodes[0]["remappings"].elts[0].elts[0])
    assert source == "/camera/raw" and source not in {v for k, v in vars(policy_node).items() if k.endswith("_TOPIC")}


@pytest.mark.parametrize(("module", "params", "extra", "ready"), [
    ("refinevla_ros.policy_node", "config/policy.yaml", ["-p", "policy_factory:=test.ros.policies:constant_policy"],
     "configured: policy ConstantPolicy"),
    ("refinevla_ros.widowx_node", "config/widowx.yaml", [], "ready, DRY RUN"),
])
def test_parameter_files_load_in_real_nodes(module, params, extra, ready):
    """rcl parses the files (`--params-file`, as launch passes them) and the nodes start with them."""
    with node_process(module, ["--params-file", str(ROOT / params), *extra]) as proc:
        deadline_ok = _wait_for(lambda: ready in proc.output() or not proc.alive(), 60)
        assert deadline_ok and proc.alive(), proc.output()
    assert "Traceback" not in proc.output()


def _wait_for(predicate, timeout: float) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def node_ros_args(launch: LaunchFile, node: dict, arguments: dict[str, str]) -> tuple[str, list[str]]:
    """What `ros2 launch` would run for a refinevla Node action: (module, --ros-args ...), launch arguments resolved
    from their declared defaults and `arguments`. Lets the graph run here, where `launch` is not installable."""
    defaults = {}
    for stmt in launch.tree.body:
        if isinstance(stmt, ast.Assign) and any(getattr(t, "id", "") == "ARGUMENTS" for t in stmt.targets):
            defaults = {row[0]: row[1] for row in _const(stmt.value)}
    values = {**defaults, **arguments}

    def resolve(expr: ast.expr) -> str:
        if isinstance(expr, ast.Call) and _name(expr.func) == "ParameterValue":
            return resolve(expr.args[0])
        if isinstance(expr, ast.Call) and _name(expr.func) in ("arg", "LaunchConfiguration"):
            return values[_const(expr.args[0])]
        if isinstance(expr, ast.List):
            return "".join(resolve(e) for e in expr.elts)
        if isinstance(expr, ast.Name):  # a local variable of generate_launch_description, e.g. camera_topic
            assigned = [a.value for a in ast.walk(launch.tree) if isinstance(a, ast.Assign)
                        and any(getattr(t, "id", "") == expr.id for t in a.targets)]
            return resolve(assigned[0])
        value = _const(expr)
        assert value is not None, f"cannot resolve {ast.dump(expr)}"
        return str(value)

    exe, name = _const(node["executable"]), _const(node["name"])
    args = ["-r", f"__node:={name}"]
    for rel in launch.parameter_files(node):
        args += ["--params-file", str(ROOT / rel)]
    for key, expr in launch.inline_parameters(node).items():
        value = resolve(expr)
        if value != "":  # an empty string is the parameter files' and the dataclasses' default already
            args += ["-p", f"{key}:={value}"]
    for pair in getattr(node.get("remappings"), "elts", []):
        source, target = pair.elts
        args += ["-r", f"{_const(source)}:={resolve(target)}"]
    return NODE_CONFIGS[exe][2], args


def test_widowx_launch_graph_runs_as_launched_with_a_remapped_camera(tmp_path):
    """widowx.launch.py's two nodes with its parameters and remappings (camera_topic:=/wrist/image), a stand-in
    policy and no Interbotix (dry run): images on the remapped topic drive the dry-run arm."""
    import numpy as np
    from sensor_msgs.msg import Image
    from std_msgs.msg import String

    from refinevla_ros.conversions import rgb_to_image
    from refinevla_ros.policy_node import INSTRUCTION_QOS
    from test.ros.rosutil import peer_node, spin_until

    launch = LaunchFile(ROOT / "launch" / "widowx.launch.py")
    arguments = {"policy_factory": "test.ros.policies:image_mean_policy", "camera_topic": "/wrist/image",
                 "control_rate_hz": "10.0"}
    commands = {_const(n["executable"]): node_ros_args(launch, n, arguments) for n in refinevla_nodes(launch)}
    assert set(commands) == {"policy_node", "widowx_node"}
    with peer_node("widowx_launch_peer") as (node, ex):
        node.create_publisher(String, "/refinevla/instruction", INSTRUCTION_QOS).publish(String(data="reach"))
        camera = node.create_publisher(Image, "/wrist/image", 10)
        image = rgb_to_image(np.full((24, 32, 3), 128, dtype=np.uint8))
        with node_process(*commands["widowx_node"]) as arm, node_process(*commands["policy_node"]) as policy:
            assert spin_until(ex, lambda: "dry run: would move" in arm.output(), 90,
                              every=lambda: camera.publish(image)), policy.output() + arm.output()
            assert "DRY RUN" in arm.output() and "without a robot connection" in arm.output()
            assert "camera /wrist/image" in policy.output()
            assert "refused" not in arm.output(), "deltas arrive in the arm's frame (wx250s/base_link)"


@pytest.mark.slow
@pytest.mark.sim
def test_sim_launch_graph_runs_as_launched():
    """sim.launch.py's sim_bridge_node + policy_node with its parameters: lock-step episodes advance."""
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

    from refinevla.msg import EpisodeStatus
    from test.ros.rosutil import peer_node, spin_until

    if not os.environ.get("VK_ICD_FILENAMES") and not os.path.exists("/usr/share/vulkan/icd.d"):
        pytest.skip("no Vulkan driver: source .venv/refinevla_env.sh (./setup.sh installs lavapipe)")
    launch = LaunchFile(ROOT / "launch" / "sim.launch.py")
    commands = {_const(n["executable"]): node_ros_args(launch, n, {
        "policy_factory": "test.ros.policies:image_mean_policy", "image_size": "64"}) for n in refinevla_nodes(launch)}
    statuses: list[EpisodeStatus] = []
    qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    with peer_node("sim_launch_peer") as (node, ex):
        node.create_subscription(EpisodeStatus, "/refinevla/episode_status", statuses.append, qos)
        with node_process(*commands["sim_bridge_node"]) as sim, node_process(*commands["policy_node"]) as policy:
            assert spin_until(ex, lambda: any(s.step >= 5 for s in statuses), 240), sim.output() + policy.output()
            assert sim.alive() and policy.alive()
