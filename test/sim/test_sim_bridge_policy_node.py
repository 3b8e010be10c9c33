"""Evaluation through the ROS nodes (`refinevla eval --via ros-policy-node`): sim_bridge_node and policy_node in
their own processes, this process only resets episodes and watches. Its own module, so no other bridge is running on
the same topics (test_sim_bridge_node's module fixture is gone by then)."""

from __future__ import annotations

import numpy as np
import pytest

from refinevla_core.eval.runner import run_episode
from refinevla_ros.sim_eval_client import evaluate_via_ros
from test.sim.standin_policy import make

pytestmark = pytest.mark.sim


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
