"""What a teacher is shown for one frame: the demonstrated future actions in words and numbers, and the prompt text.

Like ECoT, the teacher explains a demonstration it can see the continuation of: the next k actions of the trajectory
go into the prompt (robot base frame, centimetres and degrees, gripper open/closed), so the rationale's plan agrees
with what the robot actually did. Every teacher renders its prompt here, and `prompt_hash` names exactly what was
asked, so a changed template or rendering never reuses annotations made for another prompt.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# bump when describe_actions/describe_motion/render_user_prompt change what the teacher sees
PROMPT_FORMAT_VERSION = 1

# below these a motion component is "still": half a millimetre, half a degree
TRANSLATION_EPS_M = 0.0005
ROTATION_EPS_RAD = math.radians(0.5)
GRIPPER_OPEN_THRESHOLD = 0.5  # Bridge convention: 1 = open, 0 = closed

USER_FIELDS = (
    "instruction", "task", "frame", "last_frame", "num_frames", "progress_percent",
    "num_future", "future_actions", "motion_summary", "image_note",
)
REASK_FIELDS = ("error",)

_AXES = (("forward", "backward"), ("left", "right"), ("up", "down"))


def gripper_is_open(value: float) -> bool:
    return float(value) > GRIPPER_OPEN_THRESHOLD


def _signed_cm(value_m: float) -> str:
    return f"{value_m * 100:+.1f} cm"


def _translation_words(delta_m: Sequence[float]) -> str:
    """'1.2 cm forward, 0.4 cm down' (robot base frame: x forward, y left, z up); 'no translation' when still."""
    parts = []
    for value, (positive, negative) in zip(delta_m, _AXES, strict=True):
        if abs(value) >= TRANSLATION_EPS_M:
            parts.append(f"{abs(value) * 100:.1f} cm {positive if value > 0 else negative}")
    return ", ".join(parts) if parts else "no translation"


def _rotation_words(delta_rad: Sequence[float]) -> str:
    parts = [
        f"{name} {math.degrees(value):+.1f}°"
        for name, value in zip(("roll", "pitch", "yaw"), delta_rad, strict=True)
        if abs(value) >= ROTATION_EPS_RAD
    ]
    return ", ".join(parts) if parts else "no rotation"


def describe_actions(actions: np.ndarray) -> str:
    """One line per demonstrated action: translation, rotation and gripper, e.g.
    't+0: 1.2 cm forward, 0.4 cm down; no rotation; gripper open'."""
    actions = np.asarray(actions, dtype=np.float64).reshape(-1, 7)
    lines = []
    for i, a in enumerate(actions):
        gripper = "open" if gripper_is_open(a[6]) else "closed"
        lines.append(f"t+{i}: {_translation_words(a[:3])}; {_rotation_words(a[3:6])}; gripper {gripper}")
    return "\n".join(lines) if lines else "(no further actions: this is the last frame)"


def gripper_events(actions: np.ndarray, gripper_now: float | None = None) -> list[tuple[int, str]]:
    """(step, 'close'|'open') where the commanded gripper changes within `actions` (relative to `gripper_now`,
    or to the first action when unknown)."""
    actions = np.asarray(actions, dtype=np.float64).reshape(-1, 7)
    if not len(actions):
        return []
    previous = gripper_is_open(actions[0, 6] if gripper_now is None else gripper_now)
    events = []
    for i, a in enumerate(actions):
        now = gripper_is_open(a[6])
        if now != previous:
            events.append((i, "open" if now else "close"))
            previous = now
    return events


def describe_motion(actions: np.ndarray, gripper_now: float | None = None) -> str:
    """The window's motion in one sentence: net translation and rotation, and when the gripper opens or closes."""
    actions = np.asarray(actions, dtype=np.float64).reshape(-1, 7)
    if not len(actions):
        return "no further motion: the demonstration ends here"
    n = len(actions)
    total = actions[:, :6].sum(axis=0)
    steps = f"over the next {n} step{'s' if n != 1 else ''}"
    translation = _translation_words(total[:3])
    rotation = _rotation_words(total[3:])
    sentence = f"{steps}: move {translation}" if translation != "no translation" else f"{steps}: hold position"
    sentence += f", {'keep the orientation' if rotation == 'no rotation' else 'rotate ' + rotation}"
    events = gripper_events(actions, gripper_now)
    if events:
        sentence += ", " + ", then ".join(f"{kind} the gripper at t+{step}" for step, kind in events)
    else:
        sentence += f", keep the gripper {'open' if gripper_is_open(actions[0, 6]) else 'closed'}"
    return sentence


def image_note(offsets: Sequence[int]) -> str:
    """How the attached images relate to the frame being annotated."""
    if list(offsets) == [0]:
        return "the attached image is the current camera frame"
    notes = [
        f"image {i + 1} is the current frame" if off == 0
        else f"image {i + 1} is {off} step{'s' if off != 1 else ''} later"
        for i, off in enumerate(offsets)
    ]
    return "; ".join(notes)


@dataclass(frozen=True)
class PromptValues:
    """Everything a prompt template may name (USER_FIELDS)."""

    instruction: str
    task: str
    frame: int
    num_frames: int
    future_actions: np.ndarray  # (k, 7)
    image_offsets: tuple[int, ...]
    gripper_now: float | None = None

    def as_fields(self) -> dict[str, Any]:
        return {
            "instruction": self.instruction,
            "task": self.task or "unspecified",
            "frame": self.frame,
            "last_frame": self.num_frames - 1,
            "num_frames": self.num_frames,
            "progress_percent": round(100 * self.frame / max(1, self.num_frames - 1)),
            "num_future": len(self.future_actions),
            "future_actions": describe_actions(self.future_actions),
            "motion_summary": describe_motion(self.future_actions, self.gripper_now),
            "image_note": image_note(self.image_offsets),
        }


def template_fields(template: str) -> set[str]:
    """The placeholder names used by a str.format template (raises ValueError on broken braces)."""
    return {name.split(".")[0].split("[")[0] for _, name, _, _ in string.Formatter().parse(template) if name}


def check_template(template: str, allowed: Sequence[str], what: str) -> None:
    """Raise ValueError naming unknown placeholders and the valid ones (a typo must not reach 100k paid calls)."""
    try:
        used = template_fields(template)
    except ValueError as e:
        raise ValueError(f"{what}: broken braces ({e}); write a literal brace as {{{{ or }}}}") from None
    unknown = sorted(used - set(allowed))
    if unknown:
        raise ValueError(f"{what}: unknown placeholder(s) {unknown}; valid: {sorted(allowed)}")


def render(template: str, values: dict[str, Any]) -> str:
    return template.format(**values).strip()


def prompt_hash(**parts: Any) -> str:
    """A short stable digest of what the teacher is asked (templates, window sizes, rendering version)."""
    payload = json.dumps({"format_version": PROMPT_FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def png_data_url(image: np.ndarray) -> str:
    """An HxWx3 uint8 image as the data URL chat-completions servers accept in image_url."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")
