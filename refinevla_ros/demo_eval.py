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
settings `refinevla eval --via ros-policy-node` uses (refinevla_ros.sim_eval_client: bridge_command,
POLICY_NODE_EVAL_PARAMS), so the demo's numbers and that command's agree.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor

from refinevla.msg import Action, EpisodeStatus
from refinevla.msg import Rationale as RationaleMsg
from refinevla.srv import ResetEpisode
from refinevla_core.demo.analysis import parses
from refinevla_core.sim.config import SimConfig
from refinevla_ros.sim_bridge_node import (
    COMMAND_QOS,
    EE_DELTA_TOPIC,
    IMAGE_TOPIC,
    RESET_SERVICE,
    STATUS_QOS,
    STATUS_TOPIC,
    stamp_ns,
)
from refinevla_ros.sim_eval_client import POLICY_NODE_EVAL_PARAMS, bridge_command

ACTION_TOPIC = "/refinevla/action"
RATIONALE_STRUCTURED_TOPIC = "/refinevla/rationale_structured"
DIAGNOSTICS_TOPIC = "/diagnostics"
PROBE_S = 1.5
READY_TIMEOUT_S = 300.0
FIRST_ACTION_RETRY_S = 60.0  # no Action for an episode's first image this long after the reset: reset the same seed
MAX_FIRST_STEP_RETRIES = 2
KEEP_RATIONALES = 12

class LaneError(RuntimeError):
    """The evaluation cannot go on; the message says why and includes the node logs."""


def ros_args(params: dict[str, Any]) -> list[str]:
    """`-p name:=value` arguments (floats keep their decimal point, lists in YAML flow style)."""
    out = []
    for key, value in params.items():
        if isinstance(value, bool):
            text = str(value).lower()
        elif isinstance(value, (list, tuple)):
            text = "[" + ",".join(repr(float(v)) if isinstance(v, float) else str(v) for v in value) + "]"
        else:
            text = repr(value) if isinstance(value, float) else str(value)
        out += ["-p", f"{key}:={text}"]
    return out


def policy_node_params(model: dict[str, Any]) -> dict[str, Any]:
    """policy_node parameters for one model: the evaluation settings of refinevla eval --via ros-policy-node (one step
    per image stamp, no watchdog hold while the lockstep simulator waits, the simulator's own per-step limits), the
    checkpoint, and its rationale mode (PolicyConfig keys under `policy.`)."""
    return {**POLICY_NODE_EVAL_PARAMS, "device": "cpu", "checkpoint": str(Path(model["checkpoint"]).resolve()),
            "policy.rationale_mode": model["rationale_mode"],
            "policy.rationale_every_n": int(model.get("rationale_every_n", 10)),
            "policy.seed": int(model.get("seed", 0)), "policy.torch_threads": 1}


class NodeProcess:
    """A node command in its own process and session, output to a log file; stopped with SIGINT, killed if stuck."""

    def __init__(self, command: list[str], log_path: Path) -> None:
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("wb")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=env)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 2500) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()


def pick_domain(candidates: list[int]) -> int:
    """The first candidate ROS domain on which no other node shows up within PROBE_S."""
    for domain in candidates:
        ctx = Context()
        rclpy.init(context=ctx, domain_id=domain)
        try:
            node = rclpy.create_node("refinevla_demo_probe", context=ctx)
            executor = SingleThreadedExecutor(context=ctx)
            executor.add_node(node)
            deadline = time.monotonic() + PROBE_S
            others: list[str] = []
            while time.monotonic() < deadline and not others:
                executor.spin_once(timeout_sec=0.05)
                others = [n for n in node.get_node_names() if n != "refinevla_demo_probe"]
            executor.shutdown()
            node.destroy_node()
        finally:
            rclpy.shutdown(context=ctx)
        if not others:
            return domain
    raise LaneError(f"every candidate ROS domain {candidates} has other ROS nodes on it; stop them or free a domain")


@dataclasses.dataclass
class _Episode:
    index: int
    statuses: list[EpisodeStatus] = dataclasses.field(default_factory=list)


class LaneDriver:
    """Resets episodes and records what the bridge and the policy node publish (runs in the lane process)."""

    def __init__(self, ctx: Context, step_timeout_s: float) -> None:
        self.node = rclpy.create_node("refinevla_demo_eval", context=ctx)
        self.executor = SingleThreadedExecutor(context=ctx)
        self.executor.add_node(self.node)
        self.step_timeout_s = step_timeout_s
        self.statuses: list[EpisodeStatus] = []
        self.actions: dict[int, list[Action]] = {}
        self.rationales: dict[int, RationaleMsg] = {}
        self.policy_state = ""
        self.node.create_subscription(EpisodeStatus, STATUS_TOPIC, self.statuses.append, STATUS_QOS)
        self.node.create_subscription(Action, ACTION_TOPIC, self._on_action, COMMAND_QOS)
        self.node.create_subscription(RationaleMsg, RATIONALE_STRUCTURED_TOPIC, self._on_rationale, COMMAND_QOS)
        self.node.create_subscription(DiagnosticArray, DIAGNOSTICS_TOPIC, self._on_diagnostics, 10)
        self.reset_client = self.node.create_client(ResetEpisode, RESET_SERVICE)

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()

    # ---- callbacks -----------------------------------------------------------------------------------------------
    def _on_action(self, msg: Action) -> None:
        self.actions.setdefault(stamp_ns(msg.header.stamp), []).append(msg)

    def _on_rationale(self, msg: RationaleMsg) -> None:
        self.rationales[stamp_ns(msg.header.stamp)] = msg

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name.startswith("policy_node"):
                values = {kv.key: kv.value for kv in status.values}
                self.policy_state = values.get("state", self.policy_state)

    # ---- waiting -------------------------------------------------------------------------------------------------
    def spin_until(self, predicate: Callable[[], Any], what: str, timeout_s: float,
                   check: Callable[[], None] | None = None) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if check is not None:
                check()
            self.executor.spin_once(timeout_sec=0.01)
        value = predicate()
        if not value:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        return value

    def wait_for_policy_node(self, check: Callable[[], None]) -> None:
        """policy_node loaded its checkpoint, is active, and listens to the camera."""
        self.policy_state = ""
        self.spin_until(lambda: self.policy_state == "active" and self.node.count_subscribers(IMAGE_TOPIC) >= 1,
                        "policy_node to load its checkpoint and become active", READY_TIMEOUT_S, check)
        self._spin_for(0.5, check)  # let the bridge's camera publisher match the new subscription

    def _spin_for(self, seconds: float, check: Callable[[], None]) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            check()
            self.executor.spin_once(timeout_sec=0.01)

    def wait_policy_node_gone(self, check: Callable[[], None], timeout_s: float = 30.0) -> None:
        """After stopping a policy node: its publisher leaves the graph before the next model's node starts."""
        try:
            self.spin_until(lambda: self.node.count_publishers(EE_DELTA_TOPIC) == 0, "", timeout_s, check)
        except TimeoutError:
            raise LaneError(f"{self.node.count_publishers(EE_DELTA_TOPIC)} EE-delta publisher(s) still on ROS domain "
                            f"{os.environ.get('ROS_DOMAIN_ID')} {timeout_s:.0f} s after policy_node stopped: another "
                            "process publishes robot commands there; stop it and rerun") from None

    def check_isolation(self, check: Callable[[], None], grace_s: float = 5.0) -> None:
        """This lane's bridge and policy node are the only ones on the domain (a policy node stopped a moment ago
        may linger in the graph for a little while: it gets `grace_s`)."""
        def alone() -> bool:
            return self.node.count_publishers(STATUS_TOPIC) <= 1 and self.node.count_publishers(EE_DELTA_TOPIC) <= 1

        try:
            self.spin_until(alone, "", grace_s, check)
        except TimeoutError:
            bridges, policies = self.node.count_publishers(STATUS_TOPIC), self.node.count_publishers(EE_DELTA_TOPIC)
            raise LaneError(f"{bridges} sim bridges and {policies} EE-delta publishers on ROS domain "
                            f"{os.environ.get('ROS_DOMAIN_ID')}: another process shares it; stop it and rerun"
                            ) from None

    # ---- one episode ---------------------------------------------------------------------------------------------
    def reset(self, seed: int, check: Callable[[], None]) -> ResetEpisode.Response:
        future = self.reset_client.call_async(ResetEpisode.Request(task="", seed=int(seed)))
        response = self.spin_until(lambda: future.done() and future.result(), f"{RESET_SERVICE} to answer", 120.0,
                                   check)
        if not response.success:
            raise LaneError(f"the bridge could not reset to seed {seed}: {response.message}")
        return response

    def run_episode(self, seed: int, check: Callable[[], None]) -> dict[str, Any]:
        started = time.perf_counter()
        retries = 0
        while True:
            response = self.reset(seed, check)
            episode = _episode_index(response)
            first = self.spin_until(lambda e=episode: self._status(e, step=0), f"episode {episode}'s first status",
                                    60.0, check)
            first_ns = stamp_ns(first.header.stamp)
            try:
                self.spin_until(lambda ns=first_ns, e=episode: ns in self.actions or self._status(e, done=True),
                                f"policy_node's first action of seed {seed}", FIRST_ACTION_RETRY_S, check)
                break
            except TimeoutError:
                if retries >= MAX_FIRST_STEP_RETRIES:
                    raise LaneError(f"policy_node never acted on the first image of seed {seed} "
                                    f"({retries + 1} resets)") from None
                retries += 1  # the first image was lost before policy_node matched the camera: restart the episode
        last_progress = time.monotonic()
        seen = 0
        while True:
            done = self._status(episode, done=True)
            if done is not None:
                break
            count = sum(1 for s in self.statuses if s.episode == episode)
            if count != seen:
                seen, last_progress = count, time.monotonic()
            if time.monotonic() - last_progress > self.step_timeout_s:
                raise LaneError(f"seed {seed}: no simulator step for {self.step_timeout_s:.0f} s (after step "
                                f"{seen - 1})")
            check()
            self.executor.spin_once(timeout_sec=0.01)
        # the Action of the last step may arrive just after the final status: wait for it (briefly)
        stamps = [stamp_ns(s.header.stamp) for s in self.statuses if s.episode == episode and not s.done]
        with contextlib.suppress(TimeoutError):
            self.spin_until(lambda: all(ns in self.actions for ns in stamps), "", 2.0, check)
        return self._record(seed, response.instruction, episode, retries, time.perf_counter() - started)

    def _status(self, episode: int, step: int | None = None, done: bool = False) -> EpisodeStatus | None:
        for s in self.statuses:
            if s.episode == episode and (step is None or s.step == step) and (not done or s.done):
                return s
        return None

    def _record(self, seed: int, instruction: str, episode: int, retries: int, wall_s: float) -> dict[str, Any]:
        statuses = sorted((s for s in self.statuses if s.episode == episode), key=lambda s: s.step)
        last = statuses[-1]
        latency, fresh, holds, duplicates, rationales, parsed = [], [], {}, 0, [], 0
        late_first = False
        for status in statuses[:-1]:  # every observation the policy acted on
            ns = stamp_ns(status.header.stamp)
            acts = self.actions.get(ns, [])
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
            rationale = self.rationales.get(ns)
            is_fresh = bool(rationale is not None and rationale.fresh)
            fresh.append(is_fresh)
            parsed += int(is_fresh and parses(rationale.text))
            if is_fresh and len(rationales) < KEEP_RATIONALES:
                rationales.append({"step": int(status.step), "text": rationale.text})
        record = {"seed": seed, "instruction": instruction, "task": last.task, "success": bool(last.ever_success),
                  "final_success": bool(last.success), "steps": int(last.step), "wall_s": round(wall_s, 3),
                  "latency_ms": latency, "fresh_rationale": fresh, "holds": holds, "duplicate_actions": duplicates,
                  "first_step_before_instruction": late_first, "first_step_resets": retries,
                  "rationales": rationales, "rationales_parsed": parsed, "via": "ros: sim_bridge_node + policy_node"}
        # forget this episode's messages
        stamps = {stamp_ns(s.header.stamp) for s in statuses}
        for ns in stamps:
            self.actions.pop(ns, None)
            self.rationales.pop(ns, None)
        self.statuses[:] = [s for s in self.statuses if s.episode > episode]
        return record


def _episode_index(response: ResetEpisode.Response) -> int:
    head = response.message.split(":", 1)[0]
    if not head.startswith("episode "):
        raise LaneError(f"unexpected ResetEpisode answer {response.message!r}: is this sim_bridge_node?")
    return int(head.split()[1])


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


def run_lane(spec: dict[str, Any]) -> None:
    sim = SimConfig(**spec["sim"])
    candidates = list(spec.get("domains") or random.Random(os.getpid()).sample(range(1, 101), 100))
    domain = pick_domain(candidates)
    os.environ["ROS_DOMAIN_ID"] = str(domain)  # the node processes inherit it
    work = Path(spec["work_dir"])
    work.mkdir(parents=True, exist_ok=True)
    bridge = NodeProcess(bridge_command(sim, privileged_state=False), work / "sim_bridge.log")
    ctx = Context()
    rclpy.init(context=ctx, domain_id=domain)
    driver = LaneDriver(ctx, float(spec.get("step_timeout_s", 120.0)))
    policy: NodeProcess | None = None
    try:
        def check() -> None:
            for name, proc in (("sim_bridge_node", bridge), ("policy_node", policy)):
                if proc is not None and not proc.alive():
                    raise LaneError(f"{name} exited ({proc.proc.returncode}):\n{proc.log_tail()}")

        driver.spin_until(driver.reset_client.service_is_ready, "sim_bridge_node's reset service", READY_TIMEOUT_S,
                          check)
        print(f"[demo_eval] ROS domain {domain}: sim_bridge_node up", flush=True)
        for model in spec["models"]:
            out = Path(model["out_dir"])
            out.mkdir(parents=True, exist_ok=True)
            episodes_path = out / "episodes.jsonl"
            seeds = [int(model["seed"]) + i for i in range(int(model["episodes"]))]
            todo = [s for s in seeds if s not in done_seeds(episodes_path)]
            if not todo:
                continue
            command = [sys.executable, "-m", "refinevla_ros.policy_node", "--ros-args",
                       *ros_args(policy_node_params(model))]
            policy = NodeProcess(command, out / "logs" / "policy_node.log")
            try:
                driver.wait_for_policy_node(check)
                print(f"[demo_eval] {model['name']}: policy_node active", flush=True)
                for seed in todo:
                    driver.check_isolation(check)
                    record = driver.run_episode(seed, check)
                    record["model"] = model["name"]
                    _append_line(episodes_path, record)
                    print(f"[demo_eval] {model['name']} seed {seed}: "
                          f"{'success' if record['success'] else 'failure'} in {record['steps']} steps", flush=True)
            except (TimeoutError, LaneError) as e:
                raise LaneError(f"{model['name']}: {e}\n--- policy_node log:\n{policy.log_tail()}\n"
                                f"--- sim_bridge_node log:\n{bridge.log_tail()}") from None
            finally:
                policy.stop()
                policy = None
            driver.wait_policy_node_gone(check)
    finally:
        driver.close()
        rclpy.shutdown(context=ctx)
        bridge.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, required=True, help="lane specification (JSON)")
    args = parser.parse_args(argv)
    try:
        run_lane(json.loads(args.spec.read_text()))
    except LaneError as e:
        print(f"[demo_eval] error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("[demo_eval] interrupted: finished episodes are kept; rerun to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
