"""The simulator-privileged teacher: rationales that are true of the scene, deterministic, and loud about bad state."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from refinevla_core.annotation.sim_teacher import PHASES, SimTeacher, relative_words, validate_state
from refinevla_core.annotation.teacher import FrameRequest, TeacherError
from test.core.annotation_util import push_state


def pick_state(phase: str, holding: str | None = None) -> dict:
    return {
        "task": "PlaceCube", "phase": phase,
        "objects": {
            "cube": {"position": [0.20, 0.05, 0.02], "description": "green cube", "size_m": 0.04},
            "bowl": {"position": [0.20, -0.10, 0.03], "description": "yellow bowl"},
        },
        "target": {"name": "plate", "position": [0.35, 0.00, 0.01], "description": "white plate"},
        "gripper": {"position": [0.10, 0.05, 0.12], "opening": 0.0 if holding else 1.0, "holding": holding},
    }


def actions(n: int, dx: float = 0.0, dz: float = 0.0, gripper: list[float] | None = None) -> np.ndarray:
    a = np.zeros((n, 7), np.float32)
    a[:, 0], a[:, 2] = dx, dz
    a[:, 6] = gripper if gripper is not None else 1.0
    return a


@pytest.mark.parametrize("phase", [p for p in PHASES if p != "push"])
def test_sections_name_the_true_objects_and_the_phase(phase):
    holding = "cube" if phase in ("lift", "transport", "place") else None
    r = SimTeacher().rationale(pick_state(phase, holding), "put the green cube on the plate", actions(3, dx=0.01))
    assert "green cube" in r.observation and "yellow bowl" in r.observation and "white plate" in r.observation
    assert f"Current phase: {phase}" in r.situation_analysis
    assert "put the green cube on the plate" in r.situation_analysis
    assert f"Now ({phase})" in r.task_planning
    assert "3.0 cm forward" in r.task_planning  # the demonstrated motion, summed over the window
    assert ("holds the green cube" in r.situation_analysis) == (holding == "cube")


def test_spatial_reasoning_uses_the_poses():
    r = SimTeacher().rationale(pick_state("approach"), "put the green cube on the plate", actions(1))
    # cube - gripper = (+10, 0, -10) cm; plate - cube = (+15, -5, -1) cm; bowl - cube = (0, -15, +1) cm
    assert "The green cube is 14.1 cm from the gripper, 10.0 cm forward and 10.0 cm below it." in r.spatial_reasoning
    assert "white plate is 15.8 cm from the green cube, 15.0 cm forward, 5.0 cm to the right and 1.0 cm below" \
        in r.spatial_reasoning
    assert "The yellow bowl is 15.0 cm to the right and 1.0 cm above the green cube." in r.spatial_reasoning
    held = SimTeacher().rationale(pick_state("lift", "cube"), "put the green cube on the plate", actions(1))
    assert "The green cube is in the gripper." in held.spatial_reasoning


def test_plan_lists_the_remaining_steps_and_the_gripper_command():
    r = SimTeacher().rationale(pick_state("approach"), "put the green cube on the plate",
                               actions(4, dz=-0.01, gripper=[1, 1, 0, 0]))
    assert r.task_planning.startswith("Remaining steps: 1) move the gripper to the green cube, 2) close the gripper "
                                      "on the green cube, 3) lift the green cube, 4) carry the green cube to the "
                                      "white plate, 5) lower the green cube onto the white plate, 6) open the "
                                      "gripper to release the green cube, 7) stop.")
    assert "4.0 cm down" in r.task_planning and "close the gripper at t+2" in r.task_planning
    push = SimTeacher().rationale(push_state(3, 9), "push the red cube to the target", actions(2, dx=0.01))
    assert "Current phase: push" in push.situation_analysis
    assert "1) push the red cube onto the red/white target disc, 2) stop" in push.task_planning


def test_the_instruction_picks_the_object_to_talk_about():
    r = SimTeacher().rationale(pick_state("approach"), "move the yellow bowl to the plate", actions(1))
    assert r.spatial_reasoning.startswith("The yellow bowl is")


def test_deterministic():
    teacher = SimTeacher()
    request = FrameRequest(episode=0, frame=2, num_frames=9, instruction="push the red cube to the target",
                           task="PushCube-v1", future_actions=actions(5, dx=0.01), state=push_state(2, 9))
    assert teacher.annotate(request).rationale == SimTeacher().annotate(copy.deepcopy(request)).rationale
    assert teacher.name == "sim:v1" and teacher.prompt_hash == SimTeacher().prompt_hash
    assert SimTeacher(future_actions=3).prompt_hash != teacher.prompt_hash


def test_relative_words():
    assert relative_words(np.array([0.0, 0.0, 0.001])) == "at the same place as"
    assert relative_words(np.array([-0.02, 0.0, 0.0])) == "2.0 cm backward"


@pytest.mark.parametrize("mutate, match", [
    (lambda s: s.update(phase="grasping"), r"'phase' is 'grasping', expected one of"),
    (lambda s: s.pop("objects"), "'objects' must map object names"),
    (lambda s: s["objects"]["cube"].update(position=[0, 0]), r"objects\['cube'\]\['position'\] must be \[x, y, z\]"),
    (lambda s: s["gripper"].update(opening=2), r"gripper\['opening'\] is 2, expected a number in 0..1"),
    (lambda s: s["gripper"].update(holding="spoon"), "'spoon', which is not one of the objects"),
    (lambda s: s.update(target=[1, 2, 3]), "'target' must be null or hold 'position'"),
])
def test_state_that_breaks_the_contract_is_named(mutate, match):
    state = push_state(0, 6)
    mutate(state)
    with pytest.raises(TeacherError, match=match):
        validate_state(state, "episode 0 frame 0")


def test_missing_state_names_the_fix():
    with pytest.raises(TeacherError, match=r"no privileged simulator state.*refinevla collect.*--teacher openai"):
        SimTeacher().check_episode({"length": 3, "states": None}, "episode 4")
    with pytest.raises(TeacherError, match="2 privileged states for 3 frames"):
        SimTeacher().check_episode({"length": 3, "states": [push_state(0, 3)] * 2}, "episode 4")
