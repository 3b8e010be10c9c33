"""Node launchers for a pip install: `refinevla-policy-node`, `refinevla-sim-bridge-node`, `refinevla-widowx-node`,
`refinevla-observation-check-node` on the venv's PATH (console scripts in setup.py).

Why: `ros2 run refinevla <node>` needs a system ROS 2 and a colcon workspace; a pip user has rclpy from the wheels
but no `ros2` command. Each launcher runs the same `main()` as `ros2 run`, with the same `--ros-args ...`, plus two
shorthands that need no `--ros-args`:

    refinevla-policy-node --params-file policy -p checkpoint:=runs/tiny/final
    refinevla-sim-bridge-node --params-file sim_bridge -p sim.task:=PickCube-v1

`--params-file` takes a path or the name of a shipped preset (config/<name>.yaml, found from any folder, also in an
installed wheel); repeat it to layer files (later wins, as in ROS). `-p key:=value` and `-r from:=to` pass through.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from refinevla_core.config import ConfigError, available_configs, find_config_file

# launcher name -> (module with main(args), the params file a typical run starts from)
NODES: dict[str, tuple[str, str]] = {
    "policy": ("refinevla_ros.policy_node", "policy"),
    "sim-bridge": ("refinevla_ros.sim_bridge_node", "sim_bridge"),
    "widowx": ("refinevla_ros.widowx_node", "widowx"),
    "observation-check": ("refinevla_ros.observation_check_node", ""),
}
SHORTHANDS = {"--params-file", "-p", "--param", "-r", "--remap"}


def ros_arguments(argv: Sequence[str]) -> list[str]:
    """Launcher arguments -> the node's arguments: shorthands before `--ros-args` are moved into one `--ros-args`
    block (params files resolved to paths); anything from `--ros-args` on is kept as given."""
    argv = list(argv)
    split = argv.index("--ros-args") if "--ros-args" in argv else len(argv)
    head, tail = argv[:split], argv[split:]
    ros: list[str] = []
    i = 0
    while i < len(head):
        option = head[i]
        if option not in SHORTHANDS:
            raise ConfigError(f"unknown option {option}; use --params-file NAME_OR_PATH, -p key:=value, "
                              "-r from:=to, or --ros-args ... (see --help)")
        if i + 1 >= len(head):
            raise ConfigError(f"{option} needs a value")
        value = head[i + 1]
        if option == "--params-file":
            ros += ["--params-file", str(find_config_file(value).resolve())]
        elif option in ("-p", "--param"):
            if ":=" not in value:
                raise ConfigError(f"-p {value}: write key:=value, e.g. -p control_rate_hz:=5.0")
            ros += ["-p", value]
        else:
            ros += ["-r", value]
        i += 2
    if tail:
        return [*(["--ros-args", *ros] if ros else []), *tail]
    return ["--ros-args", *ros] if ros else []


def usage(name: str) -> str:
    module, preset = NODES[name]
    example = f" --params-file {preset}" if preset else ""
    return (f"usage: refinevla-{name}-node [--params-file NAME_OR_PATH ...] [-p key:=value ...] [-r from:=to ...] "
            f"[--ros-args ...]\n\nRuns {module} (what `ros2 run refinevla {module.rsplit('.', 1)[-1]}` runs) without a "
            f"system ROS 2.\n\nexample:\n  refinevla-{name}-node{example} -p key:=value\n\n"
            f"shipped params files: {', '.join(available_configs())}\n")


def launch(name: str, argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(usage(name))
        return 0
    try:
        node_args = ros_arguments(argv)
    except ConfigError as e:
        print(f"refinevla-{name}-node: {e}", file=sys.stderr)
        return 2
    main = importlib.import_module(NODES[name][0]).main
    return int(main([f"refinevla-{name}-node", *node_args]) or 0)


def policy_node() -> int:
    return launch("policy")


def sim_bridge_node() -> int:
    return launch("sim-bridge")


def widowx_node() -> int:
    return launch("widowx")


def observation_check_node() -> int:
    return launch("observation-check")
