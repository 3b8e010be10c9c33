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
