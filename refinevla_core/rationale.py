"""The four-section ReFineVLA rationale: the schema the teacher writes and the policy learns to generate.

One canonical rendering (`Rationale.text()`) is the training target and what the policy's output is parsed back
from, so teacher replies in any shape (JSON, markdown headings, numbered lists) end up as exactly one text form.
Invalid or empty sections raise `RationaleError`: a malformed reply is rejected, never stored.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from typing import Any

# (field name, heading) in the paper's order (Figure 2)
SECTIONS: tuple[tuple[str, str], ...] = (
    ("observation", "Observation"),
    ("situation_analysis", "Situation Analysis"),
    ("spatial_reasoning", "Spatial Reasoning"),
    ("task_planning", "Task Planning"),
)
SECTION_FIELDS = tuple(name for name, _ in SECTIONS)
SECTION_HEADINGS = dict(SECTIONS)
MAX_SECTION_CHARS = 2000


class RationaleError(ValueError):
    """A rationale (teacher reply or generated text) is malformed; the message says which section and why."""


@dataclass(frozen=True)
class Rationale:
    observation: str
    situation_analysis: str
    spatial_reasoning: str
    task_planning: str

    def __post_init__(self) -> None:
        for name in SECTION_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, str):
                raise RationaleError(f"section {SECTION_HEADINGS[name]!r} must be text, got {type(value).__name__}")
            clean = _normalise_space(value)
            if not clean:
                raise RationaleError(f"section {SECTION_HEADINGS[name]!r} is empty")
            if len(clean) > MAX_SECTION_CHARS:
                raise RationaleError(
                    f"section {SECTION_HEADINGS[name]!r} has {len(clean)} characters (max {MAX_SECTION_CHARS})"
                )
            object.__setattr__(self, name, clean)

    def text(self) -> str:
        """The canonical training text: one line per section, 'Heading: content'."""
        return "\n".join(f"{heading}: {getattr(self, name)}" for name, heading in SECTIONS)

    def to_dict(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Rationale:
        return cls(**{name: data.get(name, "") for name in SECTION_FIELDS})


def _normalise_space(text: str) -> str:
    text = text.replace("\r\n", "\n").strip()
    # collapse runs of spaces/newlines: one canonical form regardless of the teacher's layout
    return re.sub(r"\s+", " ", text).strip()


def _key_to_field(key: str) -> str | None:
    k = re.sub(r"[^a-z]", "", key.lower())
    for name, heading in SECTIONS:
        if k in (name.replace("_", ""), heading.lower().replace(" ", "")):
            return name
    aliases = {"situation": "situation_analysis", "spatial": "spatial_reasoning", "plan": "task_planning",
               "planning": "task_planning", "taskplan": "task_planning", "observations": "observation"}
    return aliases.get(k)


def _flatten(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(_flatten(v) for v in value)
    if isinstance(value, dict):
        return " ".join(f"{k}: {_flatten(v)}" for k, v in value.items())
    if value is None:
        return ""
    return str(value)


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S | re.I)


def _parse_json(text: str) -> dict[str, str] | None:
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        candidates.append(text[start : end + 1])
    for cand in candidates:
        try:
            obj = json.loads(cand)
        except (json.JSONDecodeError, ValueError):
            continue
        if isinstance(obj, dict):
            if len(obj) == 1 and isinstance(next(iter(obj.values())), dict):
                obj = next(iter(obj.values()))  # {"rationale": {...}}
            out: dict[str, str] = {}
            for k, v in obj.items():
                name = _key_to_field(str(k))
                if name:
                    out[name] = _flatten(v)
            if out:
                return out
    return None


_HEADING = re.compile(
    r"^[\s>#*_\-\d.)(]*"  # markdown heading marks, bullets, numbering "1." "(2)"
    r"(observation|observations|situation\s*analysis|spatial\s*reasoning|task\s*planning)"
    r"[\s*_]*[:\-—]?[\s*_]*",
    re.I | re.M,
)


def _parse_headed(text: str) -> dict[str, str] | None:
    matches = list(_HEADING.finditer(text))
    if not matches:
        return None
    out: dict[str, str] = {}
    for i, m in enumerate(matches):
        name = _key_to_field(m.group(1))
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        if name and name not in out:
            out[name] = text[m.end() : end]
    return out


def parse_rationale(reply: str) -> Rationale:
    """Parse a teacher reply or generated text: JSON first, then headed text. Raises RationaleError."""
    if not isinstance(reply, str) or not reply.strip():
        raise RationaleError("the reply is empty")
    sections = _parse_json(reply) or _parse_headed(reply)
    if not sections:
        raise RationaleError(
            "the reply has neither a JSON object nor the headings "
            + ", ".join(h for _, h in SECTIONS)
        )
    missing = [SECTION_HEADINGS[n] for n in SECTION_FIELDS if not _normalise_space(sections.get(n, ""))]
    if missing:
        raise RationaleError(f"the reply is missing or has empty section(s): {', '.join(missing)}")
    return Rationale.from_dict(sections)
