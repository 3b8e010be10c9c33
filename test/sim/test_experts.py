"""Scripted experts: pure functions of the privileged state that solve the CI tasks (>= 90 % of seeds)."""

from __future__ import annotations

import numpy as np
import pytest

from refinevla_core.sim.experts import ExpertError, ScriptedExpertPolicy, expert_step, phase_of

CI_TASKS = ["PushCube-v1", "PickCube-v1"]


def success_rate(backend, seeds) -> tuple[float, list[int]]:
    failed = []
    for seed in seeds:
        backend.reset(seed)
        while not backend.episode.done:
            backend.step(expert_step(backend.privileged_state())[1])
        if not backend.episode.ever_success:
            failed.append(seed)
    return 1 - len(failed) / len(seeds), failed


@pytest.mark.sim
@pytest.mark.parametrize("task", CI_TASKS)
def test_expert_solves_ci_task(state_only, task):
    rate, failed = success_rate(state_only(task), range(100, 110))
    assert rate >= 0.9, f"{task}: expert failed seeds {failed}"


@pytest.mark.sim
@pytest.mark.slow
@pytest.mark.parametrize("task", [*CI_TASKS, "StackCube-v1"])
def test_expert_success_rate_over_100_seeds(state_only, task):
    rate, failed = success_rate(state_only(task), range(1000, 1100))
    assert rate >= 0.9, f"{task}: {rate:.2f}, failed seeds {failed}"


def push_state(tcp, cube=(0.0, 0.0, 0.02), goal=(0.2, 0.0, 0.001)):
    return {"task": "PushCube-v1", "phase": "approach",
            "objects": {"cube": {"position": list(cube), "orientation_wxyz": [1, 0, 0, 0]}},
            "target": {"name": "goal", "position": list(goal)},
            "gripper": {"position": list(tcp), "orientation_wxyz": [0, 1, 0, 0], "opening": 0.0, "holding": None}}


def test_push_expert_branches():
    phase, a = expert_step(push_state(tcp=(0.0, 0.0, 0.18)))  # high above the cube: go behind it, over its top
    assert phase == "approach" and a[0] < 0 and a[2] < 0 and a[6] == 0.0
    phase, a = expert_step(push_state(tcp=(-0.045, 0.0, 0.02)))  # behind and low: push forward
    assert phase == "push" and a[0] > 0.05 and abs(a[1]) < 1e-9
    assert phase_of(push_state(tcp=(0.1, 0.0, 0.02), cube=(0.15, 0.0, 0.02))) == "done"  # in the target
    assert np.all(np.abs(a[:3]) <= 0.1)


def test_expert_refuses_what_it_cannot_solve():
    with pytest.raises(ExpertError, match="no scripted expert for task 'OpenDoor-v1'"):
        expert_step({"task": "OpenDoor-v1"})
    broken = push_state(tcp=(0, 0, 0.1))
    del broken["target"]
    with pytest.raises(ExpertError, match="lacks 'target'"):
        expert_step(broken)
    assert phase_of({"task": "OpenDoor-v1"}) == "approach"


def test_expert_policy_has_the_policy_interface():
    policy = ScriptedExpertPolicy(lambda: push_state(tcp=(-0.045, 0.0, 0.02)))
    policy.reset()
    out = policy.predict(np.zeros((8, 8, 3), np.uint8), "push the cube")
    assert out.action.dtype == np.float32 and out.action.shape == (7,) and "push" in out.rationale_text
