"""End-effector pose arithmetic for Bridge-style delta actions, shared by the WidowX adapter, the sim and the guards.

A BridgeData V2 action step moves the end-effector TARGET pose (not the measured one): the translation is added along
the base axes, and the rotation R = Rz(yaw)·Ry(pitch)·Rx(roll) turns the gripper about its own point with base-frame
axes (bridge_data_robot `action2transform_local`: Teef·[R|Δ]·Teef⁻¹ with Teef a pure translation). Written once here
so every consumer composes deltas the same way (see msg/EndEffectorDelta.msg).
"""

from __future__ import annotations

import numpy as np


def euler_to_matrix(roll: float, pitch: float, yaw: float) -> np.ndarray:
    """Extrinsic x-y-z (roll about base x first) as a 3x3 rotation: Rz(yaw) @ Ry(pitch) @ Rx(roll)."""
    cr, sr = np.cos(roll), np.sin(roll)
    cp, sp = np.cos(pitch), np.sin(pitch)
    cy, sy = np.cos(yaw), np.sin(yaw)
    rx = np.array([[1.0, 0.0, 0.0], [0.0, cr, -sr], [0.0, sr, cr]])
    ry = np.array([[cp, 0.0, sp], [0.0, 1.0, 0.0], [-sp, 0.0, cp]])
    rz = np.array([[cy, -sy, 0.0], [sy, cy, 0.0], [0.0, 0.0, 1.0]])
    return rz @ ry @ rx


def matrix_to_euler(rotation: np.ndarray) -> tuple[float, float, float]:
    """Inverse of euler_to_matrix (pitch in [-pi/2, pi/2]); used for logging poses in readable units."""
    r = np.asarray(rotation, dtype=np.float64)
    pitch = float(np.arcsin(np.clip(-r[2, 0], -1.0, 1.0)))
    if abs(np.cos(pitch)) > 1e-9:
        roll = float(np.arctan2(r[2, 1], r[2, 2]))
        yaw = float(np.arctan2(r[1, 0], r[0, 0]))
    else:  # gimbal lock: put everything into yaw
        roll = 0.0
        yaw = float(np.arctan2(-r[0, 1], r[1, 1]))
    return roll, pitch, yaw


def apply_ee_delta(target: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """Compose a 6-D delta (dx, dy, dz, droll, dpitch, dyaw) onto a 4x4 base->EE target pose; returns a new pose.

    Translation: p' = p + (dx, dy, dz) in base axes. Rotation about the EE point with base axes: R' = R_delta @ R.
    """
    t = np.asarray(target, dtype=np.float64)
    d = np.asarray(delta, dtype=np.float64).reshape(-1)
    if t.shape != (4, 4):
        raise ValueError(f"target pose must be a 4x4 homogeneous matrix; got shape {t.shape}")
    if d.size != 6:
        raise ValueError(f"an EE delta has 6 values (dx, dy, dz, droll, dpitch, dyaw); got {d.size}")
    out = np.eye(4)
    out[:3, :3] = euler_to_matrix(*d[3:6]) @ t[:3, :3]
    out[:3, 3] = t[:3, 3] + d[:3]
    return out


def pose_matrix(position: np.ndarray | list[float], rpy: np.ndarray | list[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """A 4x4 pose from a position (m) and extrinsic roll, pitch, yaw (rad)."""
    out = np.eye(4)
    out[:3, :3] = euler_to_matrix(*rpy)
    out[:3, 3] = np.asarray(position, dtype=np.float64)
    return out


def is_valid_pose(pose: np.ndarray, tol: float = 1e-6) -> bool:
    """True for a finite 4x4 rigid transform (orthonormal rotation with det +1, last row 0 0 0 1)."""
    p = np.asarray(pose, dtype=np.float64)
    if p.shape != (4, 4) or not np.all(np.isfinite(p)):
        return False
    r = p[:3, :3]
    return (np.allclose(r @ r.T, np.eye(3), atol=tol) and abs(np.linalg.det(r) - 1.0) < tol
            and np.allclose(p[3], [0.0, 0.0, 0.0, 1.0], atol=tol))
