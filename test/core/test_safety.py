"""The guards between model output and robot: clipping, workspace, NaN/inf, gripper, stale-image watchdog, poses."""

from __future__ import annotations

import numpy as np
import pytest

from refinevla_core.config import ConfigError, from_dict
from refinevla_core.pose import apply_ee_delta, euler_to_matrix, is_valid_pose, matrix_to_euler, pose_matrix
from refinevla_core.safety import (
    ActionGuard,
    SafetyConfig,
    StaleImageWatchdog,
    check_action,
    clamp_to_workspace,
    clip_delta,
    sanitize_gripper,
)


def test_clip_delta_per_axis_and_reports_which_axes():
    out, axes = clip_delta(np.array([0.2, -0.01, -0.3, 0.1, 1.0, -0.5]), (0.05, 0.05, 0.05, 0.25, 0.25, 0.25))
    np.testing.assert_allclose(out, [0.05, -0.01, -0.05, 0.1, 0.25, -0.25])
    assert axes == ["x", "z", "pitch", "yaw"]
    same, none = clip_delta(np.full(6, 0.01), (0.05,) * 6)
    np.testing.assert_allclose(same, 0.01)
    assert none == []


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("index", [0, 4, 6])
def test_non_finite_anywhere_holds_the_whole_step(bad, index):
    guard = ActionGuard(SafetyConfig())
    ok = guard.check(np.array([0.01, 0, 0, 0, 0, 0, 0.0]))  # closes the gripper
    assert not ok.safe_hold and ok.gripper == 0.0
    action = np.array([0.01, 0.02, 0.0, 0.0, 0.0, 0.0, 1.0])
    action[index] = bad
    step = guard.check(action)
    assert step.safe_hold
    assert "non-finite" in step.reason
    np.testing.assert_array_equal(step.delta, np.zeros(6))
    assert step.gripper == 0.0, "a hold keeps the previous gripper command (an object is not dropped)"
    assert np.all(np.isfinite(step.action))


@pytest.mark.parametrize("action", [np.zeros(6), np.zeros(8), np.zeros((2, 7)), "left", None])
def test_wrong_shape_or_type_is_held_with_a_reason(action):
    a, reason = check_action(action)
    assert a is None and reason
    step = ActionGuard().check(action)
    assert step.safe_hold and step.reason == reason


def test_guard_clips_and_says_so():
    step = ActionGuard().check(np.array([1.0, 0.0, 0.0, 0.0, 0.0, -3.0, 0.7], dtype=np.float32))
    assert not step.safe_hold
    np.testing.assert_allclose(step.delta, [0.05, 0, 0, 0, 0, -0.25])
    assert step.clipped_axes == ["x", "yaw"]
    assert "clipped x, yaw" in step.reason
    assert step.gripper == pytest.approx(0.7)
    assert step.action.dtype == np.float32 and step.action.shape == (7,)


def test_workspace_bounds_on_the_integrated_target():
    cfg = SafetyConfig(workspace_bounds=True, workspace_min=(0.1, -0.1, 0.0), workspace_max=(0.4, 0.1, 0.2),
                       workspace_start=(0.38, 0.0, 0.1))
    guard = ActionGuard(cfg)
    first = guard.check(np.array([0.05, 0, 0, 0, 0, 0, 1.0]))  # 0.38 + 0.05 > 0.40: only 0.02 allowed
    assert first.delta[0] == pytest.approx(0.02)
    assert "workspace" in first.reason
    second = guard.check(np.array([0.05, 0, -0.05, 0, 0, 0, 1.0]))  # already at the x bound: x stays
    assert second.delta[0] == pytest.approx(0.0)
    assert second.delta[2] == pytest.approx(-0.05)
    np.testing.assert_allclose(guard.target_position, [0.4, 0.0, 0.05])
    back = guard.check(np.array([-0.05, 0, 0, 0, 0, 0, 1.0]))  # moving back inside is never limited
    assert back.delta[0] == pytest.approx(-0.05) and back.reason == ""
    guard.reset_target()
    np.testing.assert_allclose(guard.target_position, cfg.workspace_start)


def test_without_bounds_deltas_are_not_limited_by_the_workspace():
    guard = ActionGuard(SafetyConfig(workspace_start=(0.45, 0.0, 0.1)))
    step = guard.check(np.array([0.05, 0, 0, 0, 0, 0, 1.0]))
    assert step.delta[0] == pytest.approx(0.05) and step.reason == ""


def test_clamp_to_workspace_names_axes():
    out, axes = clamp_to_workspace(np.array([0.5, 0.0, -1.0]), (0.1, -0.1, 0.0), (0.4, 0.1, 0.2))
    np.testing.assert_allclose(out, [0.4, 0.0, 0.0])
    assert axes == ["x", "z"]


@pytest.mark.parametrize(("value", "binarize", "expected", "noted"), [
    (0.3, False, 0.3, False),
    (1.7, False, 1.0, True),
    (-0.2, False, 0.0, True),
    (0.49, True, 0.0, False),
    (0.5, True, 1.0, False),
    (float("nan"), False, 0.25, True),
])
def test_sanitize_gripper(value, binarize, expected, noted):
    v, note = sanitize_gripper(value, previous=0.25, binarize=binarize)
    assert v == pytest.approx(expected)
    assert bool(note) == noted


@pytest.mark.parametrize("bad", [
    {"max_delta": [0.05, 0.05, 0.05, 0.25, 0.25]},
    {"max_delta": [0.05, 0.05, -0.05, 0.25, 0.25, 0.25]},
    {"workspace_min": [0.5, 0, 0], "workspace_max": [0.4, 0.1, 0.1]},
    {"gripper_threshold": 1.0},
])
def test_bad_safety_config_fails_with_the_field_named(bad):
    with pytest.raises(ConfigError) as e:
        from_dict(SafetyConfig, bad)
    assert any(key in str(e.value) for key in bad)


def test_watchdog_trips_after_timeout_and_warns_once():
    wd = StaleImageWatchdog(timeout_s=0.5)
    first = wd.check(now=10.0)
    assert first.stale and first.age_s is None and "no camera image" in first.reason and not first.warn
    wd.start(now=10.0)
    assert not wd.check(now=10.3).warn, "still within the timeout after start"
    waiting = wd.check(now=10.6)
    assert waiting.stale and waiting.warn and "0.6 s since start" in waiting.reason
    assert not wd.check(now=10.7).warn
    wd.image_received(now=10.0)
    assert not wd.check(now=10.4).stale
    assert wd.status(now=10.6).stale and not wd.status(now=10.6).warn, "status() is side-effect free"
    tripped = wd.check(now=10.6)
    assert tripped.stale and tripped.warn and "0.60 s old" in tripped.reason
    again = wd.check(now=11.0)
    assert again.stale and not again.warn, "warn once per stale period"
    wd.image_received(now=11.1)
    assert not wd.check(now=11.2).stale
    assert wd.check(now=12.0).warn, "a new stale period warns again"
    with pytest.raises(ValueError, match="positive"):
        StaleImageWatchdog(0)


def test_euler_matrix_round_trip_and_convention():
    r = euler_to_matrix(0.1, -0.2, 0.3)
    np.testing.assert_allclose(matrix_to_euler(r), (0.1, -0.2, 0.3), atol=1e-12)
    # extrinsic x then y then z == Rz @ Ry @ Rx
    rx, ry, rz = euler_to_matrix(0.1, 0, 0), euler_to_matrix(0, -0.2, 0), euler_to_matrix(0, 0, 0.3)
    np.testing.assert_allclose(r, rz @ ry @ rx, atol=1e-12)
    # yaw turns base x towards base y
    np.testing.assert_allclose(euler_to_matrix(0, 0, np.pi / 2) @ [1, 0, 0], [0, 1, 0], atol=1e-12)


def test_apply_ee_delta_rotates_about_the_ee_point_with_base_axes():
    start = pose_matrix([0.3, 0.0, 0.2], [0.0, np.pi / 2, 0.0])  # gripper pointing down
    moved = apply_ee_delta(start, np.array([0.01, -0.02, 0.0, 0.0, 0.0, np.pi / 2]))
    assert is_valid_pose(moved)
    # translation is along base axes, independent of the rotation
    np.testing.assert_allclose(moved[:3, 3], [0.31, -0.02, 0.2], atol=1e-12)
    # the rotation is applied on the left (base axes): R' = Rz(90°) @ R
    np.testing.assert_allclose(moved[:3, :3], euler_to_matrix(0, 0, np.pi / 2) @ start[:3, :3], atol=1e-12)
    # and it is NOT the EE-frame (right-multiplied) composition
    assert not np.allclose(moved[:3, :3], start[:3, :3] @ euler_to_matrix(0, 0, np.pi / 2))
    # bridge_data_robot's form: Teef·[R|Δ]·Teef⁻¹ applied to the target, Teef = translation to the EE point
    teef = pose_matrix(start[:3, 3])
    step = pose_matrix([0.01, -0.02, 0.0], [0.0, 0.0, np.pi / 2])
    np.testing.assert_allclose(moved, teef @ step @ np.linalg.inv(teef) @ start, atol=1e-12)


def test_apply_ee_delta_rejects_bad_shapes():
    with pytest.raises(ValueError, match="4x4"):
        apply_ee_delta(np.eye(3), np.zeros(6))
    with pytest.raises(ValueError, match="6 values"):
        apply_ee_delta(np.eye(4), np.zeros(7))
    assert not is_valid_pose(np.full((4, 4), np.nan))
