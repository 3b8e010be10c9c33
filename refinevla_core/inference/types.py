"""What a policy returns: the contract between the model side and every consumer (ROS nodes, eval, bench)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from refinevla_core.rationale import Rationale


@dataclass
class PolicyOutput:
    """One decision. `action` is un-normalised, Bridge convention:
    dx, dy, dz (m), droll, dpitch, dyaw (rad), gripper (1 = open, 0 = closed)."""

    action: np.ndarray  # float32[7]
    rationale: Rationale | None = None  # None for action-only steps
    rationale_text: str = ""  # the raw generated text (kept even when it does not parse into four sections)
    rationale_fresh: bool = False  # generated at this step (False: reused from the cache, or none)
    timings_ms: dict[str, float] = field(default_factory=dict)  # e.g. preprocess, rationale, action, total

    @property
    def gripper(self) -> float:
        return float(self.action[6])

    @property
    def delta(self) -> np.ndarray:
        return self.action[:6]
