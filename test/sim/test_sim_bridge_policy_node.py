"""Evaluation through the ROS nodes (`refinevla eval --via ros-policy-node`): sim_bridge_node and policy_node in
their own processes, this process only resets episodes and watches. Its own module, so no other bridge is running on
the same topics (test_sim_bridge_node's module fixture is gone by then)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from refinevla_core.eval.runner import run_episode
from refinevla_ros.sim_eval_client import evaluate_via_ros
from test.sim.standin_policy import make

pytestmark = pytest.mark.sim
ROOT = Path(__file__).resolve().parents[2]


def test_policy_node_through_bridge_gives_the_in_process_numbers(push_cube):
    """`refinevla eval --via ros-policy-node` path: sim_bridge_node + policy_node processes (a pixel-driven stand-in
    policy loaded by policy_factory), this process only resets and watches: the same actions, steps and outcome as
    the same policy in-process."""
    local = run_episode(make(), push_cube, 50, record_frames=True)
    [ros] = evaluate_via_ros(None, ["PushCube-v1"], 1, seed=50, sim=push_cube.config, videos_per_task=1,
                             policy_node_params={"policy_factory": "test.sim.standin_policy:make"})
    assert ros.via == "ros-policy-node"
    assert (ros.steps, ros.success, ros.instruction) == (local.steps, local.success, local.instruction)
    assert len(ros.actions) == len(local.actions) == local.steps
    assert np.allclose(ros.actions, local.actions, atol=1e-6)  # float32 model output, float64 on the wire
    assert ros.captions == local.captions  # the rationale text, per step, via refinevla/Rationale
    # the watcher records the frames it received (the camera topic is best effort): each is the in-process frame
    assert len(ros.frames) > len(local.frames) // 2, (len(ros.frames), len(local.frames))
    local_frames = {f.tobytes() for f in local.frames}
    assert all(f.tobytes() in local_frames for f in ros.frames), (len(ros.frames), len(local.frames))


def test_the_eval_command_via_policy_node_from_any_folder(tmp_path, push_cube):
    """What a user types, from a folder outside the repository: `refinevla eval --via ros-policy-node` finds the ROS
    backend through its entry point (refinevla_core names no ROS module), and its report holds the in-process
    numbers."""
    local = run_episode(make(), push_cube, 50)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the stand-in policy lives in the repository's test package
    command = [sys.executable, "-m", "refinevla_core", "eval", "--via", "ros-policy-node", "--policy-factory",
               "test.sim.standin_policy:make", "--tasks", "PushCube-v1", "--episodes", "1", "--seed", "50",
               "--image-size", str(push_cube.config.image_size), "--videos", "0", "--out", "report"]
    r = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    (episode,) = json.loads((tmp_path / "report" / "report.json").read_text())["episodes"]
    assert episode["via"] == "ros-policy-node"
    assert (episode["steps"], episode["success"], episode["instruction"]) == (local.steps, local.success,
                                                                              local.instruction)


def test_the_demo_lane_and_eval_via_policy_node_agree(tmp_path, push_cube, monkeypatch):
    """The demo's lane (refinevla_ros.demo_eval.run_lane, what `refinevla demo` runs) and `refinevla eval --via
    ros-policy-node` drive the same checkpoint through the same harness with the same policy_node settings: the same
    steps, outcome and instruction for a seed, one Action per simulator step, and the lane's fresh rationales are
    the texts eval captions those steps with."""
    from refinevla_core.data.stats import ActionStats
    from refinevla_core.model.checkpoint import save_checkpoint
    from refinevla_core.model.presets import build_from_preset
    from refinevla_ros import demo_eval

    vla = build_from_preset("tiny")  # random weights with identity statistics: they act (badly), enough to compare
    vla.processor.set_action_stats(ActionStats.identity())
    checkpoint = save_checkpoint(tmp_path / "tiny", vla, vla.processor, vla.stats, vla.refinevla_config)
    sim = dataclasses.replace(push_cube.config, max_steps=6)
    model = {"name": "tiny", "checkpoint": str(checkpoint), "rationale_mode": "every_n", "rationale_every_n": 3,
             "seed": 80, "episodes": 1, "out_dir": str(tmp_path / "lane" / "tiny")}
    domain = int(os.environ.get("ROS_DOMAIN_ID", "0"))
    monkeypatch.setenv("ROS_DOMAIN_ID", str(domain))  # run_lane sets it for its node processes: restored after
    demo_eval.run_lane({"sim": dataclasses.asdict(sim), "domains": [domain], "step_timeout_s": 120,
                        "work_dir": str(tmp_path / "lane"), "models": [model]})
    (line,) = (tmp_path / "lane" / "tiny" / "episodes.jsonl").read_text().splitlines()
    lane = json.loads(line)

    [ros] = evaluate_via_ros(None, ["PushCube-v1"], 1, seed=80, sim=sim,
                             policy_node_params=demo_eval.policy_node_params(model))
    assert (lane["steps"], lane["success"], lane["final_success"], lane["instruction"]) == \
           (ros.steps, ros.success, ros.final_success, ros.instruction)
    assert lane["holds"] == {} and lane["duplicate_actions"] == 0 and lane["first_step_resets"] == 0
    assert len(lane["latency_ms"]) == len(ros.actions) == len(ros.policy_ms) == ros.steps >= 1
    assert lane["rationales"] and lane["rationales"][0]["step"] == 0
    for rationale in lane["rationales"]:
        assert ros.captions[rationale["step"]] == rationale["text"]


@pytest.mark.slow
def test_tiny_checkpoint_closed_loop_through_policy_node_and_bridge(tmp_path, push_cube):
    """The issue's closed loop with a real checkpoint: a tiny ReFineVLA (trained for a few seconds on one example,
    so it acts, but not well) loaded by policy_node from disk, driving sim_bridge_node; the same checkpoint
    in-process gives the same actions, rationales and outcome."""
    from refinevla_core.inference.policy import Policy, PolicyConfig
    from refinevla_core.model.checkpoint import save_checkpoint
    from test.core.model_util import overfit_tiny

    vla = overfit_tiny("rationale_then_action")
    checkpoint = save_checkpoint(tmp_path / "tiny", vla, vla.processor, vla.stats, vla.refinevla_config)
    config = PolicyConfig(rationale_mode="every_n", rationale_every_n=5, torch_threads=1)
    local = run_episode(Policy.from_checkpoint(checkpoint, config=config), push_cube, 60)
    [ros] = evaluate_via_ros(None, ["PushCube-v1"], 1, seed=60, sim=push_cube.config, policy_node_params={
        "checkpoint": str(checkpoint), "policy.rationale_mode": "every_n", "policy.rationale_every_n": 5,
        "policy.torch_threads": 1})
    assert (ros.steps, ros.success) == (local.steps, local.success)
    assert np.allclose(ros.actions, local.actions, atol=1e-6)
    assert ros.captions == local.captions and local.captions[0]  # the generated rationale text, per step
