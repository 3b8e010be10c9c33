"""The simulator-privileged teacher: rationales that are true of the scene, deterministic, and loud about bad state."""

from __future__ import annotations

import copy
import re

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
    assert f"phase: {phase}," in r.situation_analysis
    assert r.task_planning.startswith("steps: " + phase) and "now move forward" in r.task_planning
    assert ("holds green cube" in r.situation_analysis) == (holding == "cube")


def test_spatial_reasoning_uses_the_poses():
    r = SimTeacher().rationale(pick_state("approach"), "put the green cube on the plate", actions(1))
    # cube - gripper = (+10, 0, -10) cm; plate - cube = (+15, -5, -1) cm; bowl - cube = (0, -15, +1) cm
    assert r.spatial_reasoning == ("green cube 10 cm forward, 10 cm down of the gripper; white plate 15 cm forward, "
                                   "5 cm right, 1 cm down of the green cube; yellow bowl 15 cm right, 1 cm up of the "
                                   "green cube.")
    held = SimTeacher().rationale(pick_state("lift", "cube"), "put the green cube on the plate", actions(1))
    assert held.spatial_reasoning.startswith("green cube in the gripper;")


_OFFSET = re.compile(r"(\d+) cm (forward|back|left|right|up|down)")
_AXIS = {"forward": (0, 1), "back": (0, -1), "left": (1, 1), "right": (1, -1), "up": (2, 1), "down": (2, -1)}


def stated_offset(clause: str) -> np.ndarray:
    """The offset a clause like 'cube 8 cm forward, 2 cm left of the gripper' states, in metres."""
    offset = np.zeros(3)
    for cm, word in _OFFSET.findall(clause):
        axis, sign = _AXIS[word]
        offset[axis] = sign * int(cm) / 100
    return offset


@pytest.mark.parametrize("seed", range(20))
def test_stated_distances_match_the_state_within_rounding(seed):
    """Every distance is a pose difference of this frame, rounded to whole cm (|error| <= 0.5 cm per axis; an
    axis under NEAR_M is left out, so <= 0.5 cm there too) - never a sum of commanded deltas."""
    rng = np.random.default_rng(seed)
    state = pick_state("approach")
    for key in ("cube", "bowl"):
        state["objects"][key]["position"] = rng.uniform([-0.2, -0.2, 0.0], [0.3, 0.2, 0.1]).tolist()
    state["target"]["position"] = rng.uniform([-0.2, -0.2, 0.0], [0.3, 0.2, 0.1]).tolist()
    state["gripper"]["position"] = rng.uniform([-0.2, -0.2, 0.0], [0.3, 0.2, 0.3]).tolist()
    big_commands = actions(5, dx=0.1, dz=-0.1)  # 50 cm of commanded deltas: must not appear as a distance
    r = SimTeacher().rationale(state, "put the green cube on the plate", big_commands)
    clauses = r.spatial_reasoning.rstrip(".").split("; ")
    cube, plate, bowl = (np.asarray(state["objects"]["cube"]["position"]), np.asarray(state["target"]["position"]),
                         np.asarray(state["objects"]["bowl"]["position"]))
    truths = [cube - np.asarray(state["gripper"]["position"]), plate - cube, bowl - cube]
    assert len(clauses) == 3
    for clause, truth in zip(clauses, truths, strict=True):
        assert np.abs(stated_offset(clause) - truth).max() <= 0.005 + 1e-9, (clause, truth)
    assert "cm" not in r.task_planning and "now move forward, down" in r.task_planning


def test_plan_lists_the_remaining_steps_and_the_gripper_command():
    r = SimTeacher().rationale(pick_state("approach"), "put the green cube on the plate",
                               actions(4, dz=-0.01, gripper=[1, 1, 0, 0]))
    assert r.task_planning == ("steps: approach, grasp, lift, transport, place, release, done; now move down, then "
                               "close the gripper.")
    push = SimTeacher().rationale(push_state(3, 9), "push the red cube to the target", actions(2, dx=0.01))
    assert "phase: push, push the red cube to the red/white target disc" in push.situation_analysis
    assert push.task_planning == "steps: push, done; now move forward."


def test_the_instruction_picks_the_object_to_talk_about():
    r = SimTeacher().rationale(pick_state("approach"), "move the yellow bowl to the plate", actions(1))
    assert r.spatial_reasoning.startswith("yellow bowl ")


def test_short_enough_for_the_tiny_presets_budget():
    """All four sections fit the tiny preset's rationale budget (96 tokens) with its offline tokenizer (one piece per
    word at most: 64-81 tokens for these scenes)."""
    from refinevla_core.model.presets import build_processor, load_preset

    config = load_preset("tiny")
    tokenizer = build_processor(config).tokenizer
    for phase in ("approach", "transport", "place"):
        text = SimTeacher().rationale(pick_state(phase, "cube" if phase != "approach" else None),
                                      "put the green cube on the plate", actions(3, dx=0.01)).text()
        assert len(tokenizer.encode(text, add_special_tokens=False)) <= config.max_rationale_tokens, text


def test_deterministic():
    teacher = SimTeacher()
    request = FrameRequest(episode=0, frame=2, num_frames=9, instruction="push the red cube to the target",
                           task="PushCube-v1", future_actions=actions(5, dx=0.01), state=push_state(2, 9))
    assert teacher.annotate(request).rationale == SimTeacher().annotate(copy.deepcopy(request)).rationale
    assert teacher.name == "sim:v2" and teacher.prompt_hash == SimTeacher().prompt_hash
    assert SimTeacher(future_actions=3).prompt_hash != teacher.prompt_hash


def test_relative_words():
    assert relative_words(np.array([0.0, 0.0, 0.001])) == "at"
    assert relative_words(np.array([-0.02, 0.0, 0.0])) == "2 cm back of"
    assert relative_words(np.array([0.004, -0.126, 0.0051])) == "13 cm right, 1 cm up of"


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
