"""demo_eval: closed-loop evaluation of trained checkpoints THROUGH the ROS nodes, for `refinevla demo`.

The policy runs inside refinevla_ros.policy_node, the simulator inside refinevla_ros.sim_bridge_node, each in its own
process, talking over loopback DDS exactly as they would with a robot; this process only resets episodes (the
bridge's ResetEpisode service) and listens: EpisodeStatus for the outcome, the policy node's Action for per-step model
latency, holds and the step counter, its Rationale for what the model said. Nothing here computes an action.

One "lane" = one bridge on one private ROS domain, evaluating models one after the other (a fresh policy_node per
model). `refinevla demo` runs several lanes side by side, each in its own process:

    python -m refinevla_ros.demo_eval --spec lane.json

Spec (JSON): {"sim": {SimConfig fields}, "domains": [candidate ROS domain ids], "step_timeout_s": 120,
              "models": [{"name", "checkpoint", "rationale_mode", "rationale_every_n", "seed", "episodes",
                          "out_dir"}]}

Isolation (a demo must never move a real robot): the lane takes the first candidate domain on which no other ROS
node is seen within PROBE_S, uses the loopback-only DDS profile when one is installed, and checks before every
episode that its bridge is the only EpisodeStatus publisher and its policy node the only EE-delta publisher.

Per model it appends one JSON line per episode to <out_dir>/episodes.jsonl as soon as the episode ends, so a killed
evaluation resumes at the next seed. Node logs go to <out_dir>/logs/. The bridge and the policy node get exactly the
settings, client and episode rules `refinevla eval --via ros-policy-node` uses (refinevla_ros.harness: BridgeGraph,
BridgeClient.watch_episode), so the demo's numbers and that command's agree.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

from refinevla_core.demo.analysis import parses
from refinevla_core.sim.config import SimConfig
from refinevla_ros.conversions import stamp_to_ns
from refinevla_ros.harness.bridge import EpisodeError, WatchedEpisode
from refinevla_ros.harness.graph import POLICY, POLICY_NODE_EVAL_PARAMS, BridgeGraph
from refinevla_ros.harness.processes import NodeExitedError
from refinevla_ros.harness.session import WaitTimeoutError, pick_free_domain
from refinevla_ros.topics import EE_DELTA_TOPIC, STATUS_TOPIC

READY_TIMEOUT_S = 300.0
KEEP_RATIONALES = 12
SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # lanes run side by side on a few cores


class LaneError(RuntimeError):
    """The evaluation cannot go on; the message says why and includes the node logs."""


def policy_node_params(model: dict[str, Any]) -> dict[str, Any]:
    """policy_node parameters for one model: the evaluation settings of refinevla eval --via ros-policy-node (one step
    per image stamp, no watchdog hold while the lockstep simulator waits, the simulator's own per-step limits), the
    checkpoint, and its rationale mode (PolicyConfig keys under `policy.`)."""
    return {**POLICY_NODE_EVAL_PARAMS, "device": "cpu", "checkpoint": str(Path(model["checkpoint"]).resolve()),
            "policy.rationale_mode": model["rationale_mode"],
            "policy.rationale_every_n": int(model.get("rationale_every_n", 10)),
            "policy.seed": int(model.get("seed", 0)), "policy.torch_threads": 1}


def lane_record(watched: WatchedEpisode) -> dict[str, Any]:
    """One episodes.jsonl line: outcome, per-step latency and fresh rationales of the steps that moved, holds by
    reason, and what went wrong on the way (duplicate Actions, a first step computed before the instruction)."""
    last = watched.last
    latency, fresh, holds, duplicates, rationales, parsed = [], [], {}, 0, [], 0
    late_first = False
    for status, acts in watched.acted_on():
        duplicates += max(0, len(acts) - 1)
        if not acts:
            continue
        act = acts[0]
        if status.step == 0 and act.step != 0:
            late_first = True  # computed before policy_node had this episode's instruction
        if act.safe_hold:
            reason = act.guard_reason.split(":")[0] or "hold"
            holds[reason] = holds.get(reason, 0) + 1
            continue
        latency.append(round(float(act.inference_latency_ms), 3))
        rationale = watched.rationales.get(stamp_to_ns(status.header.stamp))
        is_fresh = bool(rationale is not None and rationale.fresh)
        fresh.append(is_fresh)
        parsed += int(is_fresh and parses(rationale.text))
        if is_fresh and len(rationales) < KEEP_RATIONALES:
            rationales.append({"step": int(status.step), "text": rationale.text})
    return {"seed": watched.seed, "instruction": watched.instruction, "task": last.task,
            "success": bool(last.ever_success), "final_success": bool(last.success), "steps": int(last.step),
            "wall_s": round(watched.wall_s, 3), "latency_ms": latency, "fresh_rationale": fresh, "holds": holds,
            "duplicate_actions": duplicates, "first_step_before_instruction": late_first,
            "first_step_resets": watched.first_step_resets, "rationales": rationales, "rationales_parsed": parsed,
            "via": "ros: sim_bridge_node + policy_node"}


def done_seeds(path: Path) -> set[int]:
    """Seeds with a complete line in an episodes.jsonl (a torn last line from a killed lane is ignored)."""
    seeds = set()
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                seeds.add(int(json.loads(line)["seed"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
    return seeds


def _append_line(path: Path, record: dict[str, Any]) -> None:
    text = path.read_text() if path.is_file() else ""
    if text and not text.endswith("\n"):  # drop a torn last line left by a killed lane
        path.write_text(text[: text.rfind("\n") + 1])
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


class Lane:
    """One bridge on one ROS domain; models evaluated one after the other, each by a fresh policy_node."""

    def __init__(self, graph: BridgeGraph, domain: int) -> None:
        self.graph, self.client, self.domain = graph, graph.client, domain

    def check_isolation(self, grace_s: float = 5.0) -> None:
        """This lane's bridge and policy node are the only ones on the domain (a policy node stopped a moment ago
        may linger in the graph for a little while: it gets `grace_s`)."""
        node = self.client.node
        if not self.graph.session.wait(lambda: node.count_publishers(STATUS_TOPIC) <= 1
                                       and node.count_publishers(EE_DELTA_TOPIC) <= 1, grace_s):
            raise LaneError(f"{node.count_publishers(STATUS_TOPIC)} sim bridges and "
                            f"{node.count_publishers(EE_DELTA_TOPIC)} EE-delta publishers on ROS domain "
                            f"{self.domain}: another process shares it; stop it and rerun")

    def wait_policy_node_gone(self, timeout_s: float = 30.0) -> None:
        """After stopping a policy node: its publisher leaves the graph before the next model's node starts."""
        node = self.client.node
        if not self.graph.session.wait(lambda: node.count_publishers(EE_DELTA_TOPIC) == 0, timeout_s):
            raise LaneError(f"{node.count_publishers(EE_DELTA_TOPIC)} EE-delta publisher(s) still on ROS domain "
                            f"{self.domain} {timeout_s:.0f} s after policy_node stopped: another process publishes "
                            "robot commands there; stop it and rerun")

    def evaluate(self, model: dict[str, Any], seeds: list[int], episodes_path: Path) -> None:
        """Start the model's policy_node, run `seeds`, append each record as soon as its episode ends."""
        out = Path(model["out_dir"])
        self.graph.start_policy_node(policy_node_params(model), out / "logs" / "policy_node.log")
        try:
            self.client.wait_for_policy_node(READY_TIMEOUT_S)
            print(f"[demo_eval] {model['name']}: policy_node active", flush=True)
            for seed in seeds:
                self.check_isolation()
                record = lane_record(self.client.watch_episode(seed))
                record["model"] = model["name"]
                _append_line(episodes_path, record)
                print(f"[demo_eval] {model['name']} seed {seed}: "
                      f"{'success' if record['success'] else 'failure'} in {record['steps']} steps", flush=True)
        except (WaitTimeoutError, EpisodeError, NodeExitedError, LaneError) as e:
            raise LaneError(f"{model['name']}: {e}\n{self.graph.logs_text(2500)}") from None
        finally:
            self.graph.stop(POLICY)
        self.wait_policy_node_gone()


def run_lane(spec: dict[str, Any]) -> None:
    sim = SimConfig(**spec["sim"])
    candidates = list(spec.get("domains") or random.Random(os.getpid()).sample(range(1, 101), 100))
    domain = pick_free_domain(candidates)
    if domain is None:
        raise LaneError(f"every candidate ROS domain {candidates} has other ROS nodes on it; stop them or free a "
                        "domain")
    os.environ["ROS_DOMAIN_ID"] = str(domain)  # the node processes inherit it
    work = Path(spec["work_dir"])
    work.mkdir(parents=True, exist_ok=True)
    client = {"drive": False, "watch_policy": True, "camera": False, "timeout_s": 60.0,
              "step_timeout_s": float(spec.get("step_timeout_s", 120.0))}
    with BridgeGraph(sim, work / "sim_bridge.log", domain_id=domain, env={**os.environ, **SINGLE_THREAD_ENV},
                     node_name="refinevla_demo_eval", client=client) as graph:
        lane = Lane(graph, domain)
        try:
            graph.client.wait_ready(READY_TIMEOUT_S)
        except (WaitTimeoutError, NodeExitedError) as e:
            raise LaneError(f"{e}\n{graph.logs_text(2500)}") from None
        print(f"[demo_eval] ROS domain {domain}: sim_bridge_node up", flush=True)
        for model in spec["models"]:
            out = Path(model["out_dir"])
            out.mkdir(parents=True, exist_ok=True)
            episodes_path = out / "episodes.jsonl"
            seeds = [int(model["seed"]) + i for i in range(int(model["episodes"]))]
            todo = [s for s in seeds if s not in done_seeds(episodes_path)]
            if todo:
                lane.evaluate(model, todo, episodes_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, required=True, help="lane specification (JSON)")
    args = parser.parse_args(argv)
    try:
        run_lane(json.loads(args.spec.read_text()))
    except (LaneError, NodeExitedError) as e:
        print(f"[demo_eval] error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("[demo_eval] interrupted: finished episodes are kept; rerun to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
