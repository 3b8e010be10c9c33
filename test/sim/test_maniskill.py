"""ManiSkill3 backend: the Bridge <-> ManiSkill action conversion is exact and physically right (a commanded +x moves
the gripper +x, +yaw turns it counter-clockwise), episodes are reproducible, the privileged state keeps its contract."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from refinevla_core.annotation.sim_teacher import validate_state
from refinevla_core.sim.backend import SimError, validate_action
from refinevla_core.sim.maniskill import (
    bridge_to_maniskill,
    maniskill_to_bridge,
    matrix_to_rpy,
    matrix_to_xyz_intrinsic,
    rpy_to_matrix,
    xyz_intrinsic_to_matrix,
)

# scipy comes with the sim extras (mani-skill): a reference for the rotation conventions
Rotation = pytest.importorskip("scipy.spatial.transform").Rotation


def test_rotation_helpers_match_scipy():
    rng = np.random.default_rng(1)
    for angles in rng.uniform(-1.2, 1.2, (50, 3)):
        assert np.allclose(rpy_to_matrix(*angles), Rotation.from_euler("xyz", angles).as_matrix())  # extrinsic
        assert np.allclose(xyz_intrinsic_to_matrix(*angles), Rotation.from_euler("XYZ", angles).as_matrix())
        assert np.allclose(matrix_to_rpy(rpy_to_matrix(*angles)), angles)
        assert np.allclose(matrix_to_xyz_intrinsic(xyz_intrinsic_to_matrix(*angles)), angles)


def test_action_conversion_round_trips_within_range_and_clips_outside():
    rng = np.random.default_rng(2)
    for _ in range(100):
        a = np.r_[rng.uniform(-0.1, 0.1, 3), rng.uniform(-0.05, 0.05, 3), rng.uniform(0, 1)]
        n = bridge_to_maniskill(a)
        assert n.dtype == np.float32 and np.all(np.abs(n) <= 1.0)
        assert np.allclose(maniskill_to_bridge(n), a, atol=1e-6)
    n = bridge_to_maniskill([0.3, -0.3, 0.0, 0.0, 0.0, 0.0, 1.0])
    assert np.allclose(n[:3], [1.0, -1.0, 0.0]) and n[6] == 1.0  # 0.3 m is clipped to the 0.1 m step limit
    assert bridge_to_maniskill([0, 0, 0, 0, 0, 0, 0.0])[6] == -1.0  # Bridge 0 = closed = ManiSkill -1
    big_turn = maniskill_to_bridge(bridge_to_maniskill([0, 0, 0, 0.0, 0.0, 0.5, 1.0]))
    assert np.allclose(big_turn[5], 0.1, atol=1e-6)  # rotations are limited to 0.1 rad per step (by norm)
    # ManiSkill 3.0.1 scales the normalised rotation by -0.1: a positive yaw is a negative normalised value
    assert bridge_to_maniskill([0, 0, 0, 0.0, 0.0, 0.05, 1.0])[5] == pytest.approx(-0.5)


def test_bad_actions_are_refused_before_the_simulator():
    with pytest.raises(SimError, match=r"non-finite \['dy'\]"):
        validate_action([0, np.nan, 0, 0, 0, 0, 1])
    with pytest.raises(SimError, match="7 values"):
        validate_action([0.0, 0.0, 1.0])


def _tcp_rotation(state: dict) -> float:
    w, x, y, z = state["gripper"]["orientation_wxyz"]
    return Rotation.from_quat([w, x, y, z], scalar_first=True).as_matrix()


@pytest.mark.sim
def test_commanded_motion_follows_the_bridge_convention(push_cube):
    """+dx moves the TCP forward (world x), +dz up, +dyaw turns it counter-clockwise about world z, gripper 0 closes."""
    push_cube.reset(0)
    s0 = push_cube.privileged_state()
    for _ in range(3):
        push_cube.step([0.03, 0, 0.02, 0, 0, 0, 1.0])
    s1 = push_cube.privileged_state()
    moved = np.subtract(s1["gripper"]["position"], s0["gripper"]["position"])
    # pd_ee_delta_pose re-targets from the measured pose each 50 ms step, so the arm covers part of each delta
    assert moved[0] > 0.02 and moved[2] > 0.01 and abs(moved[1]) < 0.2 * moved[0], moved
    r0 = _tcp_rotation(s1)
    for _ in range(3):
        push_cube.step([0, 0, 0, 0, 0, 0.1, 0.0])
    s2 = push_cube.privileged_state()
    turn = Rotation.from_matrix(_tcp_rotation(s2) @ r0.T).as_rotvec()  # world-frame rotation between the two poses
    assert turn[2] > 0.05 and abs(turn[0]) < 0.2 * turn[2] and abs(turn[1]) < 0.2 * turn[2], turn
    assert s2["gripper"]["opening"] < s1["gripper"]["opening"] - 0.3  # closing
    assert push_cube.episode.last_gripper == 0.0


@pytest.mark.sim
def test_same_seed_and_actions_give_identical_observations(push_cube):
    rng = np.random.default_rng(3)
    actions = np.c_[rng.uniform(-0.05, 0.05, (12, 3)), np.zeros((12, 2)), rng.uniform(-0.1, 0.1, 12),
                    rng.integers(0, 2, 12)]

    def run(seed: int) -> str:
        digest = hashlib.sha256(push_cube.reset(seed).image.tobytes())
        for a in actions:
            result = push_cube.step(a)
            digest.update(result.obs.image.tobytes())
            digest.update(repr(push_cube.privileged_state()).encode())
            if result.done:
                break
        return digest.hexdigest()

    first = run(11)
    other = run(12)  # an episode in between must not leak into the next one
    assert run(11) == first
    assert other != first


@pytest.mark.sim
def test_privileged_state_follows_the_contract(push_cube):
    obs = push_cube.reset(5)
    assert obs.image.shape == (64, 64, 3) and obs.image.dtype == np.uint8 and obs.image.std() > 5
    state = push_cube.privileged_state()
    validate_state(state, "PushCube-v1 reset")  # the annotation side's checker of the same contract
    assert state["task"] == "PushCube-v1" and state["phase"] == "approach"
    cube, target = state["objects"]["cube"], state["target"]
    assert cube["description"] == "blue cube" and cube["size_m"] == 0.04
    assert cube["position"][2] == pytest.approx(0.02, abs=1e-3)  # resting on the table
    assert target["position"][0] - cube["position"][0] == pytest.approx(0.2, abs=1e-3)  # ManiSkill's layout
    assert state["gripper"]["holding"] is None and state["gripper"]["opening"] == pytest.approx(1.0, abs=0.05)
    assert math.isclose(np.linalg.norm(cube["orientation_wxyz"]), 1.0, abs_tol=1e-4)
    k = push_cube.camera_intrinsics()
    assert k.shape == (3, 3) and k[0, 2] == pytest.approx(32.0) and k[2, 2] == 1.0
    with pytest.raises(SimError, match="reset"):
        for _ in range(100):
            push_cube.step(push_cube.hold_action())  # steps past the 50-step limit are refused
