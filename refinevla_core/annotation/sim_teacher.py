"""The simulator-privileged teacher: correct rationales from ground truth, offline, deterministic, free.

It reads the privileged state the simulator collector stores per frame and the demonstrated future actions, so every
section is true by construction: the objects named are the objects in the scene, the phase is the collector's phase,
distances come from the poses, and the plan's motion and gripper commands are the demonstration's. The demo and the
tests use it; for real-robot data (no privileged state) use the openai or hf teacher.

Privileged state contract, one JSON-able dict per frame in Episode.states (metres, world frame: x forward, y left,
z up):
    {"task": "PushCube-v1",
     "phase": "approach"|"grasp"|"lift"|"transport"|"place"|"push"|"release"|"done",
     "objects": {"cube": {"position": [x,y,z], "orientation_wxyz": [w,x,y,z], "description": "red cube",
                          "size_m": 0.04}, ...},
     "target": {"name": "goal", "position": [x,y,z], "description": "red/white target disc"} or null,
     "gripper": {"position": [x,y,z], "opening": 0..1 (1 = open), "holding": "cube" or null}}
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from refinevla_core.annotation import prompts
from refinevla_core.annotation.teacher import FrameRequest, Teacher, TeacherError, TeacherReply
from refinevla_core.rationale import Rationale

SIM_TEACHER_VERSION = 2  # bump when the generated text changes: a new version means new annotations
PHASES = ("approach", "grasp", "lift", "transport", "place", "push", "release", "done")
PICK_AND_PLACE = ("approach", "grasp", "lift", "transport", "place", "release", "done")
PICK_AND_LIFT = ("approach", "grasp", "lift", "done")
PUSH = ("approach", "push", "done")
NEAR_M = 0.005  # closer than this along an axis counts as level (rounds to 0 cm)
MAX_OTHER_OBJECTS = 4  # keeps Spatial Reasoning well under the section length limit

_FIX = ("the sim teacher writes rationales from simulator ground truth, so it needs a dataset recorded by "
        "`refinevla collect` (which stores the privileged state per frame); for other datasets use "
        "--teacher openai or --teacher hf")


def _is_point(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))


def validate_state(state: Any, where: str) -> None:
    """Raise TeacherError naming the first key that breaks the privileged state contract."""
    if not isinstance(state, dict):
        raise TeacherError(f"{where}: no privileged simulator state (got {type(state).__name__}); {_FIX}")
    problems = []
    if state.get("phase") not in PHASES:
        problems.append(f"'phase' is {state.get('phase')!r}, expected one of {list(PHASES)}")
    objects = state.get("objects")
    if not isinstance(objects, dict) or not objects:
        problems.append("'objects' must map object names to {'position': [x,y,z], 'description': ...}")
    else:
        for name, obj in objects.items():
            if not isinstance(obj, dict) or not _is_point(obj.get("position")):
                problems.append(f"objects[{name!r}]['position'] must be [x, y, z] in metres")
    gripper = state.get("gripper")
    if not isinstance(gripper, dict) or not _is_point(gripper.get("position")):
        problems.append("'gripper' must hold 'position': [x, y, z] in metres")
    else:
        opening = gripper.get("opening")
        if not isinstance(opening, (int, float)) or not 0 <= opening <= 1:
            problems.append(f"gripper['opening'] is {opening!r}, expected a number in 0..1 (1 = open)")
        holding = gripper.get("holding")
        if holding is not None and (not isinstance(objects, dict) or holding not in objects):
            problems.append(f"gripper['holding'] is {holding!r}, which is not one of the objects")
    target = state.get("target")
    if target is not None and (not isinstance(target, dict) or not _is_point(target.get("position"))):
        problems.append("'target' must be null or hold 'position': [x, y, z] in metres")
    if problems:
        raise TeacherError(f"{where}: privileged state does not follow the contract: {'; '.join(problems)}")


def _label(name: str, item: dict[str, Any]) -> str:
    return str(item.get("description") or name.replace("_", " ")).strip()


def relative_words(offset_m: np.ndarray) -> str:
    """'8 cm forward, 2 cm left, 9 cm down of' for where something is relative to a reference (whole centimetres,
    per axis; axes within NEAR_M are left out)."""
    words = (("forward", "back"), ("left", "right"), ("up", "down"))
    parts = [f"{round(abs(v) * 100)} cm {pos if v > 0 else neg}"
             for v, (pos, neg) in zip(offset_m, words, strict=True) if abs(v) >= NEAR_M]
    return ", ".join(parts) + " of" if parts else "at"


def next_motion(actions: np.ndarray, gripper_now: float | None = None) -> str:
    """Direction of the demonstrated next motion ('move forward, down, then close the gripper'): the sign of the
    summed window per axis, where that axis carries at least a third of the motion; no lengths (see rationale)."""
    actions = np.asarray(actions, dtype=np.float64).reshape(-1, 7)
    if not len(actions):
        return "stop"
    total = actions[:, :3].sum(axis=0)
    big = np.abs(total) >= max(NEAR_M, np.abs(total).max() / 3)
    names = (("forward", "back"), ("left", "right"), ("up", "down"))
    moves = [pos if v > 0 else neg for v, (pos, neg), b in zip(total, names, big, strict=True) if b]
    text = "move " + ", ".join(moves) if moves else "hold position"
    events = prompts.gripper_events(actions, gripper_now)
    if events:
        text += ", then " + " and ".join(f"{kind} the gripper" for _, kind in events[:1])
    return text


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


class SimTeacher(Teacher):
    """Deterministic rationales from the privileged simulator state plus the demonstrated future actions."""

    kind = "sim"
    needs_images = False
    needs_state = True
    concurrency = 1

    def __init__(self, future_actions: int = 5) -> None:
        self.future_actions = future_actions

    @property
    def name(self) -> str:
        return f"sim:v{SIM_TEACHER_VERSION}"

    @property
    def prompt_hash(self) -> str:
        return prompts.prompt_hash(teacher="sim", version=SIM_TEACHER_VERSION, future_actions=self.future_actions)

    def check_episode(self, info: dict[str, Any], where: str) -> None:
        states = info.get("states")
        if states is None:
            raise TeacherError(f"{where} has no privileged simulator state; {_FIX}")
        length = int(info.get("length", len(states)))
        if len(states) != length:
            raise TeacherError(f"{where} has {len(states)} privileged states for {length} frames; {_FIX}")
        for t, state in enumerate(states):
            validate_state(state, f"{where} frame {t}")

    def annotate(self, request: FrameRequest) -> TeacherReply:
        where = f"episode {request.episode} frame {request.frame}"
        validate_state(request.state, where)
        rationale = self.rationale(request.state, request.instruction, request.future_actions, request.task)
        return TeacherReply(rationale=rationale, reply=rationale.text(), calls=1)

    # ---- the text -----------------------------------------------------------------------------------------------
    def rationale(self, state: dict[str, Any], instruction: str, future_actions: np.ndarray,
                  task: str = "") -> Rationale:
        """Four short sections (~50 tokens with the tiny preset's tokenizer, all of them inside the trained budget).

        Every number is a distance between poses of this frame, rounded to whole centimetres: no summed commands
        (under delta-pose control a commanded delta is a target, not a motion). The plan gives the direction of
        the demonstrated next motion, not its length."""
        objects: dict[str, dict[str, Any]] = state["objects"]
        gripper = state["gripper"]
        target = state.get("target")
        phase = state["phase"]
        main = self._main_object(objects, gripper, instruction)
        obj = _label(main, objects[main])
        goal = _label(str(target.get("name") or "target"), target) if target else "goal"
        gripper_word = "open" if float(gripper["opening"]) > prompts.GRIPPER_OPEN_THRESHOLD else "closed"
        holding = gripper.get("holding")
        plan = self._plan(phase, str(state.get("task") or task or ""), instruction, target is not None)

        seen = [_label(n, o) for n, o in objects.items()] + ([goal] if target else [])
        observation = f"gripper {gripper_word}; " + ", ".join(seen) + "."
        held = _label(holding, objects[holding]) if holding else "nothing"
        situation = f"phase: {phase}, {self._phase_sentence(phase, obj, goal)}; holds {held}."

        main_pos = np.asarray(objects[main]["position"], dtype=np.float64)
        gripper_pos = np.asarray(gripper["position"], dtype=np.float64)
        if holding == main:
            spatial = [f"{obj} in the gripper"]
        else:
            spatial = [f"{obj} {relative_words(main_pos - gripper_pos)} the gripper"]
        if target:
            target_pos = np.asarray(target["position"], dtype=np.float64)
            spatial.append(f"{goal} {relative_words(target_pos - main_pos)} the {obj}")
        for name in [n for n in objects if n != main][:MAX_OTHER_OBJECTS]:
            pos = np.asarray(objects[name]["position"], dtype=np.float64)
            spatial.append(f"{_label(name, objects[name])} {relative_words(pos - main_pos)} the {obj}")

        steps = ", ".join(plan[plan.index(phase):]) if phase in plan else "done"
        planning = f"steps: {steps}; now {next_motion(future_actions, float(gripper['opening']))}."
        return Rationale(observation, situation, "; ".join(spatial) + ".", planning)

    @staticmethod
    def _main_object(objects: dict[str, dict[str, Any]], gripper: dict[str, Any], instruction: str) -> str:
        """The held object; else the one the instruction names best; else the nearest to the gripper."""
        if gripper.get("holding") in objects:
            return gripper["holding"]
        wanted = _words(instruction)
        scores = {n: len(wanted & (_words(_label(n, o)) | _words(n))) for n, o in objects.items()}
        best = max(scores.values())
        candidates = [n for n, s in scores.items() if s == best]
        if len(candidates) == 1:
            return candidates[0]
        gripper_pos = np.asarray(gripper["position"], dtype=np.float64)
        return min(candidates, key=lambda n: float(np.linalg.norm(np.asarray(objects[n]["position"]) - gripper_pos)))

    @staticmethod
    def _plan(phase: str, task: str, instruction: str, has_target: bool) -> tuple[str, ...]:
        if phase == "push" or "push" in task.lower() or "push" in instruction.lower():
            return PUSH
        return PICK_AND_PLACE if has_target else PICK_AND_LIFT

    @staticmethod
    def _phase_sentence(phase: str, obj: str, goal: str) -> str:
        return {
            "approach": f"reach the {obj}",
            "grasp": f"close on the {obj}",
            "lift": f"lift the {obj}",
            "transport": f"carry the {obj} to the {goal}",
            "place": f"lower the {obj} onto the {goal}",
            "push": f"push the {obj} to the {goal}",
            "release": f"open to release the {obj}",
            "done": "task complete",
        }[phase]
