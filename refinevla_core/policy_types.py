"""What a policy is and returns: the contract between the model side and every consumer (ROS nodes, eval, bench).

Below both model/ and inference/ (it imports neither), so that the SpatialVLA/OpenVLA adapters in model/ and the
policies in inference/ return the same PolicyOutput without model/ importing inference/.

`PolicyLike` is the API the runner, the evaluators and the benchmarks call: `predict(image, instruction)` and
`reset()`. The real `Policy` implements it, and so can a user's own object (the policy node's `policy_factory`).
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from refinevla_core.rationale import Rationale


@dataclass
class LateRationale:
    """A rationale that finished after its step's action was published (streaming mode)."""

    text: str
    rationale: Rationale | None  # None when the text does not parse into four sections
    complete: bool = True  # False: cut short (max tokens, or stopped by a new episode)
    generate_ms: float = 0.0


@dataclass
class PolicyOutput:
    """One decision. `action` is un-normalised, Bridge convention:
    dx, dy, dz (m), droll, dpitch, dyaw (rad), gripper (1 = open, 0 = closed)."""

    action: np.ndarray  # float32[7]
    rationale: Rationale | Any | None = None  # None for action-only steps (Any: an object with the four sections)
    rationale_text: str = ""  # the raw generated text (kept even when it does not parse into four sections)
    rationale_fresh: bool = False  # generated at this step (False: reused from the cache, or none)
    timings_ms: dict[str, float] = field(default_factory=dict)  # e.g. preprocess, rationale, action, total
    # streaming: the rationale of this step is still being written; resolves to a LateRationale
    rationale_pending: Future | None = None
    # the rationale's age when this action was computed: steps and seconds since the image it was written on
    # (-1: no rationale); 0 for a rationale written at this step
    rationale_age_steps: int = -1
    rationale_age_s: float = -1.0

    @property
    def gripper(self) -> float:
        return float(self.action[6])

    @property
    def delta(self) -> np.ndarray:
        return self.action[:6]


@runtime_checkable
class PolicyLike(Protocol):
    """Anything the runner can drive: one decision per (image, instruction), and a reset between episodes."""

    def predict(self, image: np.ndarray, instruction: str) -> PolicyOutput:
        """HxWx3 uint8 RGB image + instruction -> the decision for this step."""
        ...

    def reset(self) -> None:
        """A new episode starts: forget anything cached from the last one."""
        ...


@runtime_checkable
class AttentionPolicy(Protocol):
    """Optional: a policy that can show where its action tokens looked (the node's attention overlay topic)."""

    def attention_overlay(self, image: np.ndarray) -> np.ndarray:
        ...


@runtime_checkable
class ClosablePolicy(Protocol):
    """Optional: a policy with background work (streaming / async rationales) that must be stopped on shutdown."""

    def close(self) -> None:
        ...
