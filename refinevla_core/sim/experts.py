"""Scripted experts: solve each simulated task from the privileged state, to record demonstrations and to prove the
closed loop (sim -> ROS bridge -> actions) works before any model is trained.

Every expert is a pure function of ONE privileged-state dict (refinevla_core.sim.backend's contract): no memory
between steps. So the same expert runs in-process, from the JSON the ROS bridge publishes on its debug topic, and on
recorded states; it recovers by itself when a grasp slips; and `phase_of(state)` (stored with every recorded frame
and used by the sim teacher's rationales) is exactly the branch the expert takes.

Actions are Bridge convention (m, rad, gripper 1 = open / 0 = closed), at most MAX_STEP_M / MAX_ROT_RAD per step.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from refinevla_core.policy_types import PolicyOutput

MAX_STEP_M = 0.1  # ManiSkill's per-step limit (larger deltas are clipped by the controller anyway)
MAX_ROT_RAD = 0.1
CUBE_HALF_M = 0.02
HOVER_M = 0.06  # height above the object top the TCP travels at before descending
OPEN, CLOSED = 1.0, 0.0
OPEN_ENOUGH = 0.9  # opening fraction above which the gripper counts as open
NEIGHBOUR_M = 0.1  # other objects closer than this (xy) constrain the grasp direction
FINGER_REACH_M = 0.045  # open fingertip distance from the TCP along the closing axis
FINGER_CLEAR_M = 0.04  # a neighbour centre closer than this to an open fingertip blocks the grasp


class ExpertError(ValueError):
    """The state does not belong to a task with a scripted expert, or lacks what the expert needs."""


def _p(d: dict[str, Any], *keys: str) -> np.ndarray:
    for k in keys:
        d = d[k]
    return np.asarray(d, dtype=np.float64)


def _move(tcp: np.ndarray, target: np.ndarray, gain: float = 1.0) -> np.ndarray:
    """Translation towards target, clipped per axis."""
    return np.clip(gain * (target - tcp), -MAX_STEP_M, MAX_STEP_M)


def _action(delta: np.ndarray, gripper: float, dyaw: float = 0.0) -> np.ndarray:
    return np.array([*delta, 0.0, 0.0, float(np.clip(dyaw, -MAX_ROT_RAD, MAX_ROT_RAD)), gripper], dtype=np.float64)


def _yaw_of_z_rotation(wxyz: np.ndarray) -> float:
    """Yaw of an object that only rotates about world z (cubes lying flat)."""
    w, x, y, z = wxyz
    return math.atan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z))


def _closing_axis_angle(wxyz: np.ndarray) -> float:
    """World-frame angle of the gripper's finger-closing axis (TCP y axis) projected on the table."""
    w, x, y, z = wxyz
    # second column of the rotation matrix = the TCP y axis in world coordinates
    yx, yy = 2 * (x * y - w * z), 1 - 2 * (x * x + z * z)
    return math.atan2(yy, yx)


def _yaw_alignment(state: dict[str, Any], name: str) -> float:
    """Rotation about z that lines the finger-closing axis up with a face of cube `name` (cubes repeat every 90
    degrees). The nearest face pair, unless an open fingertip would land on another object; then the other pair."""
    grip_q = state["gripper"].get("orientation_wxyz")
    obj = state["objects"][name]
    obj_q = obj.get("orientation_wxyz")
    if grip_q is None or obj_q is None:
        return 0.0
    closing = _closing_axis_angle(np.asarray(grip_q))
    err = _yaw_of_z_rotation(np.asarray(obj_q)) - closing
    err = (err + math.pi / 4) % (math.pi / 2) - math.pi / 4  # the nearest face pair, within +-45 degrees
    pos = _p(obj, "position")
    neighbours = [_p(o, "position")[:2] - pos[:2] for n, o in state["objects"].items() if n != name]
    neighbours = [d for d in neighbours if np.linalg.norm(d) < NEIGHBOUR_M]
    if not neighbours:
        return err
    other = err - math.copysign(math.pi / 2, err)  # the other face pair, within +-90 degrees

    def clearance(e: float) -> float:  # distance from the open fingertips to the nearest neighbour centre
        axis = np.array([math.cos(closing + e), math.sin(closing + e)]) * FINGER_REACH_M
        return min(float(np.linalg.norm(d - s * axis)) for d in neighbours for s in (1.0, -1.0))

    near = clearance(err)
    return err if near >= FINGER_CLEAR_M or near >= clearance(other) else other


def _grasp_branch(state: dict[str, Any], name: str) -> tuple[str, np.ndarray]:
    """approach / grasp the object `name` from above (shared by pick and stack)."""
    g = state["gripper"]
    tcp, opening = _p(g, "position"), float(g["opening"])
    obj = state["objects"][name]
    pos = _p(obj, "position")
    dyaw = _yaw_alignment(state, name)
    xy_err = float(np.linalg.norm(pos[:2] - tcp[:2]))
    at_object = xy_err < 0.012 and abs(tcp[2] - pos[2]) < 0.012
    closing = opening < OPEN_ENOUGH
    if at_object or (closing and xy_err < 0.02 and abs(tcp[2] - pos[2]) < 0.02):
        return "grasp", _action(_move(tcp, pos), CLOSED)
    if closing:  # closed but not at the object (missed or dropped it): open while moving up to hover height
        hover = np.array([tcp[0], tcp[1], pos[2] + CUBE_HALF_M + HOVER_M])
        return "approach", _action(_move(tcp, hover), OPEN, dyaw)
    if xy_err > 0.01 or abs(dyaw) > 0.05:
        above = np.array([pos[0], pos[1], max(pos[2] + CUBE_HALF_M + HOVER_M * (xy_err > 0.03), pos[2] + 0.03)])
        return "approach", _action(_move(tcp, above), OPEN, dyaw)
    return "approach", _action(_move(tcp, pos), OPEN, dyaw)


# ---- PushCube: push the cube along +x onto the target disc -------------------------------------------------------
PUSH_GOAL_RADIUS_M = 0.1
PUSH_BEHIND_M = 0.045  # TCP distance behind the cube centre while pushing


def push_cube(state: dict[str, Any]) -> tuple[str, np.ndarray]:
    tcp = _p(state, "gripper", "position")
    cube = _p(state["objects"]["cube"], "position")
    goal = _p(state["target"], "position")
    if np.linalg.norm(cube[:2] - goal[:2]) < PUSH_GOAL_RADIUS_M * 0.6:
        return "done", _action(np.zeros(3), CLOSED)
    behind = np.array([cube[0] - PUSH_BEHIND_M, cube[1], CUBE_HALF_M])
    lined_up = abs(tcp[1] - cube[1]) < 0.012 and tcp[0] < cube[0] - 0.025 and tcp[2] < 0.035
    if lined_up:
        end = np.array([goal[0] - PUSH_BEHIND_M + 0.01, cube[1], CUBE_HALF_M])
        return "push", _action(_move(tcp, end, gain=0.8), CLOSED)
    xy_err = float(np.linalg.norm(behind[:2] - tcp[:2]))
    if xy_err > 0.015:
        hover = np.array([behind[0], behind[1], CUBE_HALF_M * 2 + 0.03])
        if tcp[2] < CUBE_HALF_M * 2 + 0.01 and tcp[0] > cube[0] - 0.035:  # low and level with the cube: up first
            hover[:2] = tcp[:2]
        return "approach", _action(_move(tcp, hover), CLOSED)
    return "approach", _action(_move(tcp, behind), CLOSED)


# ---- PickCube: grasp the cube and hold it at the goal ------------------------------------------------------------
PICK_GOAL_THRESH_M = 0.025


def pick_cube(state: dict[str, Any]) -> tuple[str, np.ndarray]:
    g = state["gripper"]
    cube = _p(state["objects"]["cube"], "position")
    goal = _p(state["target"], "position")
    if g.get("holding") == "cube":
        err = goal - cube
        if np.linalg.norm(err) < PICK_GOAL_THRESH_M * 0.4:
            return "done", _action(np.zeros(3), CLOSED)
        phase = "lift" if cube[2] < CUBE_HALF_M + 0.02 else "transport"
        return phase, _action(np.clip(err, -MAX_STEP_M, MAX_STEP_M), CLOSED)
    return _grasp_branch(state, "cube")


# ---- StackCube: put the red cube on the green cube ---------------------------------------------------------------
def stack_cube(state: dict[str, Any]) -> tuple[str, np.ndarray]:
    g = state["gripper"]
    tcp, opening = _p(g, "position"), float(g["opening"])
    red = _p(state["objects"]["red_cube"], "position")
    goal = _p(state["target"], "position")  # where the red cube's centre belongs: on top of the green cube
    xy_err = float(np.linalg.norm(goal[:2] - red[:2]))
    on_top = xy_err < 0.015 and abs(red[2] - goal[2]) < 0.008
    if g.get("holding") == "red_cube":
        return _carry_onto(red, goal, xy_err, on_top)
    if on_top:
        if opening < OPEN_ENOUGH:
            return "release", _action(np.zeros(3), OPEN)
        return "done", _action(_move(tcp, np.array([tcp[0], tcp[1], goal[2] + 0.08])), OPEN)
    return _grasp_branch(state, "red_cube")


def _carry_onto(red: np.ndarray, goal: np.ndarray, xy_err: float, on_top: bool) -> tuple[str, np.ndarray]:
    """StackCube while holding the red cube: lift clear, move over the green cube, lower, release."""
    if on_top:
        return "release", _action(np.zeros(3), OPEN)
    carry_z = goal[2] + 0.025
    if xy_err > 0.01:
        if red[2] < carry_z - 0.01:  # lift clear of the green cube before moving sideways
            return "lift", _action(_move(red, np.array([red[0], red[1], carry_z + 0.01])), CLOSED)
        return "transport", _action(_move(red, np.array([goal[0], goal[1], carry_z])), CLOSED)
    return "place", _action(_move(red, goal + np.array([0, 0, 0.002]), gain=0.8), CLOSED)


EXPERTS = {"PushCube-v1": push_cube, "PickCube-v1": pick_cube, "StackCube-v1": stack_cube}


def _expert_for(state: dict[str, Any]) -> Any:
    if not isinstance(state, dict):
        raise ExpertError(f"a scripted expert needs the privileged state dict, got {type(state).__name__}")
    task = state.get("task")
    if task not in EXPERTS:
        raise ExpertError(f"no scripted expert for task {task!r}; experts exist for {sorted(EXPERTS)}")
    return EXPERTS[task]


def expert_step(state: dict[str, Any]) -> tuple[str, np.ndarray]:
    """(phase, Bridge action float64[7]) for one privileged state."""
    try:
        phase, action = _expert_for(state)(state)
    except (KeyError, TypeError) as e:
        raise ExpertError(f"privileged state for {state.get('task')!r} lacks {e}; it must follow the contract in "
                          "refinevla_core.sim.backend") from e
    return phase, action


def expert_action(state: dict[str, Any]) -> np.ndarray:
    return expert_step(state)[1]


def phase_of(state: dict[str, Any]) -> str:
    """The task phase of a state (the branch its expert takes); 'approach' for tasks without an expert."""
    if state.get("task") not in EXPERTS:
        return "approach"
    return expert_step(state)[0]


class ScriptedExpertPolicy:
    """The expert behind the policy interface (`predict`/`reset`), for `refinevla eval --policy expert`.

    It does not look at the image: it reads the privileged state through `state_fn` (in-process: the backend's
    privileged_state; through ROS: the bridge's debug topic). Honest baseline, not a learned policy."""

    def __init__(self, state_fn: Any) -> None:
        self.state_fn = state_fn

    def reset(self) -> None:
        """Stateless: nothing to clear."""

    def predict(self, image: np.ndarray, instruction: str) -> PolicyOutput:
        phase, action = expert_step(self.state_fn())
        return PolicyOutput(action=action.astype(np.float32), rationale_text=f"scripted expert, phase: {phase}")
