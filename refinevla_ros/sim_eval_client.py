"""Evaluation through ROS (`refinevla eval --via ros` and `--via ros-policy-node`): a sim_bridge_node process, and
either this process acting as the policy node (any predict/reset policy: it receives the camera image — and, for the
scripted expert only, the privileged-state debug topic — calls `policy.predict`, publishes the EE delta stamped with
the image's stamp, then the gripper), or a policy_node process acting while this process only resets and watches.

It returns the same EpisodeResult as the in-process runner (refinevla_core.eval.runner), so both paths are compared
number for number. The nodes, the client and the episode rules are refinevla_ros.harness's, shared with the demo's
lanes and the benchmarks.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from refinevla_core.eval.runner import EpisodeResult
from refinevla_core.sim.config import SimConfig
from refinevla_ros.conversions import image_to_rgb, msg_to_delta
from refinevla_ros.harness.bridge import EpisodeError, WatchedEpisode
from refinevla_ros.harness.graph import POLICY_NODE_EVAL_PARAMS, BridgeGraph
from refinevla_ros.harness.session import WaitTimeoutError

__all__ = ["POLICY_NODE_EVAL_PARAMS", "eval_result", "evaluate_via_ros"]
WATCH_KEEP_IMAGES = 200  # images kept while watching: the frames of a video


def eval_result(watched: WatchedEpisode, record_frames: bool) -> EpisodeResult:
    """A watched policy_node episode as the in-process runner's EpisodeResult: per step the first Action computed
    from that image (delta + gripper, the node's own predict time) and the text of the rationale it acted under."""
    last = watched.last
    result = EpisodeResult(task=watched.statuses[0].task, seed=watched.seed, instruction=watched.instruction,
                           success=bool(last.ever_success), final_success=bool(last.success), steps=int(last.step),
                           total_reward=float(sum(s.reward for s in watched.statuses[1:])), wall_s=watched.wall_s,
                           frames=[] if record_frames else None, via="ros-policy-node")
    for _, actions in watched.acted_on():
        if actions:
            action = actions[0]
            result.actions.append([round(float(v), 6) for v in (*msg_to_delta(action.delta), action.gripper)])
            result.policy_ms.append(float(action.inference_latency_ms))
            result.captions.append(watched.rationale_texts.get(action.rationale_id, ""))
    if record_frames:
        result.frames = [image_to_rgb(watched.images[ns]) for ns in sorted(watched.images)]
    return result


def evaluate_via_ros(make_policy: Callable[[Callable[[], dict]], Any] | None, tasks: list[str], episodes: int, *,
                     seed: int = 0, sim: SimConfig | None = None, videos_per_task: int = 0,
                     on_episode: Callable[[EpisodeResult], None] | None = None,
                     privileged_state: bool = False, timeout_s: float = 120.0,
                     policy_node_params: dict[str, Any] | None = None) -> list[EpisodeResult]:
    """The ROS twin of refinevla_core.eval.runner.evaluate: starts a sim_bridge_node and either drives it from a
    client node with `make_policy(state_fn)`, or, with `policy_node_params` (e.g. {"checkpoint": path}), starts
    refinevla_ros.policy_node with them (plus POLICY_NODE_EVAL_PARAMS) and only resets and watches.
    RuntimeError (with the nodes' logs) when a node dies or does not answer."""
    sim = dataclasses.replace(sim or SimConfig(), task=tasks[0])
    watch = policy_node_params is not None
    logs = {name: Path(tempfile.mkstemp(prefix=f"{name}-", suffix=".log")[1]) for name in ("sim_bridge", "policy")}
    client = {"drive": not watch, "watch_policy": watch, "timeout_s": timeout_s, "step_timeout_s": timeout_s,
              "keep_images": WATCH_KEEP_IMAGES if watch else 8}
    results: list[EpisodeResult] = []
    with BridgeGraph(sim, logs["sim_bridge"], privileged_state=privileged_state, client=client) as graph:
        try:
            if watch:  # starts while the bridge builds its simulator
                graph.start_policy_node(policy_node_params, logs["policy"])
            graph.client.wait_ready()
            if watch:
                graph.client.wait_for_policy_node()
            box: dict[str, Any] = {}
            policy = None if watch else make_policy(lambda: box["state"])
            for task in tasks:
                for i in range(episodes):
                    record = i < videos_per_task
                    if policy is None:
                        r = eval_result(graph.client.watch_episode(seed + i, task=task), record)
                    else:
                        r = graph.client.run_episode(policy, seed + i, task=task, record_frames=record,
                                                     state_box=box if privileged_state else None)
                    results.append(r)
                    if on_episode is not None:
                        on_episode(r)
        except (WaitTimeoutError, EpisodeError) as e:
            raise RuntimeError(f"{e}\n{graph.logs_text()}") from e
    return results
