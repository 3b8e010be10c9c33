"""The interface every simulator backend implements (SimBackend) and what it returns; no simulator is imported here.

A backend speaks the project's action convention only (Bridge: dx, dy, dz m; droll, dpitch, dyaw rad; gripper 1 = open,
0 = closed) and converts to its simulator's own convention inside. backend.py picks one (make_backend).

Privileged state (`privileged_state()`), one JSON-able dict per frame, metres, world frame (x forward, y left, z up):
    {"task": "PushCube-v1", "phase": "approach"|"grasp"|"lift"|"transport"|"place"|"push"|"release"|"done",
     "objects": {"cube": {"position": [x,y,z], "orientation_wxyz": [w,x,y,z], "description": "blue cube",
                          "size_m": 0.04}, ...},
     "target": {"name": "goal", "position": [x,y,z], "description": "red/white target disc"} or None,
     "gripper": {"position": [x,y,z], "opening": 0..1 (1 = open), "holding": "cube" or None}}
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from refinevla_core.data.episode import ACTION_DIM, ACTION_NAMES
from refinevla_core.sim.config import SimConfig


class SimError(RuntimeError):
    """The simulator cannot do what was asked; the message names the fix."""


@dataclass
class SimObservation:
    """What a policy may see: the camera image (None when rendering is off) and the episode's instruction."""

    image: np.ndarray | None  # HxWx3 uint8 RGB
    instruction: str
    step: int


class StepResult(NamedTuple):
    obs: SimObservation
    reward: float
    success: bool
    done: bool  # terminated (ManiSkill: on success) or truncated (step limit)
    info: dict[str, Any]


@dataclass
class EpisodeInfo:
    """Bookkeeping every backend keeps the same way."""

    task: str = ""
    seed: int | None = None
    instruction: str = ""
    steps: int = 0
    done: bool = False
    ever_success: bool = False
    last_gripper: float = 1.0  # the last commanded gripper (Bridge), held by hold_action()
    extra: dict[str, Any] = field(default_factory=dict)


def validate_action(action: Any) -> np.ndarray:
    """A 7-D finite Bridge-convention action as float64; raises SimError naming the bad value (bad input never moves
    the arm)."""
    a = np.asarray(action, dtype=np.float64).reshape(-1)
    if a.shape != (ACTION_DIM,):
        raise SimError(f"an action has {ACTION_DIM} values {ACTION_NAMES}; got shape {np.shape(action)}")
    bad = ~np.isfinite(a)
    if bad.any():
        names = [ACTION_NAMES[i] for i in np.flatnonzero(bad)]
        raise SimError(f"action has non-finite {names} ({a.tolist()}); refusing to step the simulator with it")
    return a


class SimBackend(abc.ABC):
    """reset(seed) -> observation; step(Bridge action) -> StepResult; privileged_state() -> dict (module docstring)."""

    name: str = "backend"

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.episode = EpisodeInfo(task=config.task)

    # ---- the interface ---------------------------------------------------------------------------------------------
    @property
    def task(self) -> str:
        return self.config.task

    @property
    def instruction(self) -> str:
        return self.episode.instruction

    @property
    @abc.abstractmethod
    def max_steps(self) -> int: ...

    @abc.abstractmethod
    def reset(self, seed: int) -> SimObservation: ...

    @abc.abstractmethod
    def step(self, action: np.ndarray) -> StepResult: ...

    @abc.abstractmethod
    def privileged_state(self) -> dict[str, Any]: ...

    @abc.abstractmethod
    def camera_intrinsics(self) -> np.ndarray:
        """3x3 pinhole matrix K of the policy camera at the configured image size."""

    def close(self) -> None:  # noqa: B027  (optional for backends without resources)
        """Release the simulator (safe to call twice)."""

    # ---- shared helpers --------------------------------------------------------------------------------------------
    def hold_action(self) -> np.ndarray:
        """'Stay where you are': no motion and the last commanded gripper (an object in the hand stays there)."""
        return np.array([0, 0, 0, 0, 0, 0, self.episode.last_gripper], dtype=np.float64)

    def _check_can_step(self) -> None:
        if self.episode.seed is None:
            raise SimError("the episode was never reset: call reset(seed) before step()")
        if self.episode.done:
            raise SimError(f"episode (seed {self.episode.seed}) is done after {self.episode.steps} steps; reset it")

    def __enter__(self) -> SimBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
