"""A trained tiny π0 checkpoint driving the simulator: in-process through Policy (chunks executed and re-planned),
and (slow) loaded by policy_node from disk over loopback DDS, driving sim_bridge_node, with the same actions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from refinevla_core.eval.runner import run_episode
from refinevla_core.inference.config import PolicyConfig
from refinevla_core.inference.policy import Policy
from refinevla_core.training.config import CONFIG_DIR, load_train_config
from refinevla_core.training.trainer import train
from test.core.training_support import make_dataset

pytestmark = pytest.mark.sim
POLICY = {"rationale_mode": "every_n", "rationale_every_n": 4, "torch_threads": 1}


@pytest.fixture(scope="module")
def push_cube():
    from test.sim.conftest import TEST_IMAGE_SIZE, _backend

    backend = _backend(task="PushCube-v1", image_size=TEST_IMAGE_SIZE)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pi0loop")
    make_dataset(root / "ds", episodes=2, length=5)
    config = load_train_config(CONFIG_DIR / "train_pi0_tiny.yaml", {
        "dataset": str(root / "ds"), "output_dir": str(root / "run"), "max_steps": 2, "batch_size": 4,
        "warmup_steps": 0, "progress_bar": False, "torch_threads": 1, "val_fraction": 0.0})
    return train(config, log=lambda _m: None).final_checkpoint


def test_pi0_checkpoint_closes_the_loop_in_process(checkpoint, push_cube):
    policy = Policy.from_checkpoint(checkpoint, config=PolicyConfig(**POLICY))
    result = run_episode(policy, push_cube, seed=3)
    actions = np.asarray(result.actions)
    assert result.steps == len(actions) > 4 and np.isfinite(actions).all()
    stats = policy.stats
    assert (actions <= stats.max + 1e-6).all() and (actions >= stats.min - 1e-6).all()
    # one chunk per 2 executed actions (the preset's execute_steps), plus one whenever a rationale is due
    assert result.steps // 2 <= policy.plans <= result.steps // 2 + result.steps // 4 + 2
    again = run_episode(policy, push_cube, seed=3)
    assert again.actions == result.actions, "seeded sampling: the same episode twice"


@pytest.mark.slow
def test_pi0_checkpoint_through_policy_node_and_sim_bridge(checkpoint, push_cube):
    from refinevla_ros.sim_eval_client import evaluate_via_ros

    local = run_episode(Policy.from_checkpoint(checkpoint, config=PolicyConfig(**POLICY)), push_cube, 11)
    [ros] = evaluate_via_ros(None, ["PushCube-v1"], 1, seed=11, sim=push_cube.config, policy_node_params={
        "checkpoint": str(checkpoint), **{f"policy.{k}": v for k, v in POLICY.items()}})
    assert (ros.steps, ros.success) == (local.steps, local.success)
    assert np.allclose(ros.actions, local.actions, atol=1e-6)
    assert ros.captions == local.captions
