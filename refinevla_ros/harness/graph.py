"""The evaluation graph: a sim_bridge_node process, policy_node processes started and stopped as needed, and this
process's client on the same ROS domain. `refinevla eval --via ros*`, the demo's lanes and `refinevla bench sim`
start the nodes with these commands and settings, so their numbers agree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from refinevla_core.sim.config import SimConfig
from refinevla_ros.harness.bridge import BridgeClient
from refinevla_ros.harness.processes import NodeProcess, node_command
from refinevla_ros.harness.session import RosSession

BRIDGE = "sim_bridge_node"
POLICY = "policy_node"
# policy_node settings for evaluation: one step per new image, a watchdog longer than any model step, the deltas'
# frame = the bridge's world, and per-step limits equal to the simulator's own (0.1 m per axis; rotations are limited
# by the simulator by norm), so the node changes no action the in-process runner would execute
POLICY_NODE_EVAL_PARAMS: dict[str, Any] = {
    "control_rate_hz": 0.0, "image_timeout_s": 600.0, "delta_frame_id": "world",
    "safety.max_delta": [0.1, 0.1, 0.1, 3.2, 3.2, 3.2],
}


def bridge_command(sim: SimConfig, privileged_state: bool, overrides: Mapping[str, Any] | None = None) -> list[str]:
    """`python -m refinevla_ros.sim_bridge_node` with lockstep stepping that waits for every action (the same
    numbers as in-process: no hold step is ever inserted by a slow policy)."""
    params: dict[str, Any] = {f"sim.{k}": v for k, v in dataclasses.asdict(sim).items()}
    params.update({"step_mode": "lockstep", "action_timeout_s": 0.0, "publish_privileged_state": privileged_state})
    params.update(overrides or {})
    return node_command("refinevla_ros.sim_bridge_node", params)


def policy_node_command(params: Mapping[str, Any]) -> list[str]:
    """`python -m refinevla_ros.policy_node` with the evaluation settings, then `params` (which win)."""
    return node_command("refinevla_ros.policy_node", {**POLICY_NODE_EVAL_PARAMS, **params})


class BridgeGraph:
    """Starts sim_bridge_node (log at `bridge_log`), then this process's session and BridgeClient (keyword
    arguments `client`) on `domain_id`. Every wait of the client checks that the node processes are alive: a dead
    node is reported at once (NodeExitedError with its log), not as a timeout. A context manager."""

    def __init__(self, sim: SimConfig, bridge_log: Path | None, *, privileged_state: bool = False,
                 domain_id: int | None = None, env: Mapping[str, str] | None = None, node_name: str = "refinevla_eval",
                 client: Mapping[str, Any] | None = None) -> None:
        self.env = env
        self.processes: dict[str, NodeProcess] = {}
        self.start(BRIDGE, bridge_command(sim, privileged_state), bridge_log)
        try:
            self.session = RosSession(node_name, domain_id, check=self.check)
            self.client = BridgeClient(self.session, privileged_state=privileged_state, **(client or {}))
        except BaseException:
            self.stop_all()
            raise

    def start(self, name: str, command: list[str], log_path: Path | None) -> NodeProcess:
        self.processes[name] = NodeProcess(command, log_path, name=name, env=self.env)
        return self.processes[name]

    def start_policy_node(self, params: Mapping[str, Any], log_path: Path | None) -> NodeProcess:
        return self.start(POLICY, policy_node_command(params), log_path)

    def stop(self, name: str) -> None:
        process = self.processes.pop(name, None)
        if process is not None:
            process.stop()

    def check(self) -> None:
        for process in list(self.processes.values()):
            process.check()

    def logs_text(self, chars: int = 2000) -> str:
        """The end of every node's log, for an error message."""
        return "\n".join(f"--- {name} log ({p.log_path}):\n{p.log_tail(chars)}" for name, p in self.processes.items())

    def stop_all(self) -> None:
        for name in list(self.processes):
            self.stop(name)

    def close(self) -> None:
        try:
            if hasattr(self, "session"):
                self.session.close()
        finally:
            self.stop_all()

    def __enter__(self) -> BridgeGraph:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
