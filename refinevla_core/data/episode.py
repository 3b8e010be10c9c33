"""Frame and Episode: the one in-memory shape every reader produces and every consumer (annotation, training,
evaluation, the ROS recorder) takes.

Actions are 7-D end-effector deltas plus gripper in the BridgeData V2 convention: (dx, dy, dz) metres,
(droll, dpitch, dyaw) radians, gripper absolute with 1 = open and 0 = closed (see refinevla_core.model.tokenizer for
converters to SimplerEnv's ±1). Validation happens here, once, so NaNs and wrong shapes are caught with the episode
and frame named instead of surfacing as a loss of NaN hours later.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from refinevla_core.rationale import Rationale

ACTION_NAMES = ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper")
ACTION_DIM = len(ACTION_NAMES)


class DataError(ValueError):
    """A dataset or episode is malformed; the message names the episode/frame and the fix."""


@dataclass
class Frame:
    """One control step: what the policy saw and what the demonstrator did."""

    image: np.ndarray  # HxWx3 uint8 RGB, the primary (3rd-person) camera
    instruction: str
    action: np.ndarray  # float32[7], Bridge convention
    state: dict[str, Any] | None = None  # privileged simulator state (object poses, gripper, phase), JSON-able
    rationale: Rationale | None = None
    episode_index: int = -1
    frame_index: int = -1


@dataclass
class Episode:
    """A trajectory: T images, T actions, one instruction."""

    images: np.ndarray  # (T, H, W, 3) uint8
    actions: np.ndarray  # (T, 7) float32
    instruction: str
    task: str = ""
    success: bool | None = None
    seed: int | None = None
    states: list[dict[str, Any]] | None = None  # T privileged states (sim only)
    rationales: list[Rationale | None] | None = None  # T entries; None where a frame has none
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.images = np.asarray(self.images)
        self.actions = np.asarray(self.actions, dtype=np.float32)

    def __len__(self) -> int:
        return int(self.actions.shape[0])

    def validate(self, where: str = "episode") -> None:
        """Raise DataError naming what is wrong; called by writers before anything touches disk."""
        t = len(self)
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise DataError(
                f"{where}: images must be (T, H, W, 3) uint8 RGB; got {self.images.shape} {self.images.dtype}"
            )
        if self.actions.ndim != 2 or self.actions.shape[1] != ACTION_DIM:
            raise DataError(f"{where}: actions must be (T, {ACTION_DIM}) {ACTION_NAMES}; got {self.actions.shape}")
        if self.images.shape[0] != t:
            raise DataError(f"{where}: {self.images.shape[0]} images but {t} actions")
        if t == 0:
            raise DataError(f"{where}: the episode is empty")
        bad = ~np.isfinite(self.actions)
        if bad.any():
            frame, dim = (int(v) for v in np.argwhere(bad)[0])
            raise DataError(
                f"{where}: action of frame {frame} has a non-finite {ACTION_NAMES[dim]} "
                f"({self.actions[frame, dim]}); {int(bad.any(axis=1).sum())} frame(s) affected — fix or drop them"
            )
        if not isinstance(self.instruction, str) or not self.instruction.strip():
            raise DataError(f"{where}: the instruction is empty")
        for name, seq in (("states", self.states), ("rationales", self.rationales)):
            if seq is not None and len(seq) != t:
                raise DataError(f"{where}: {len(seq)} {name} for {t} frames")

    def frame(self, i: int, episode_index: int = -1) -> Frame:
        return Frame(
            image=self.images[i],
            instruction=self.instruction,
            action=self.actions[i],
            state=self.states[i] if self.states is not None else None,
            rationale=self.rationales[i] if self.rationales is not None else None,
            episode_index=episode_index,
            frame_index=i,
        )

    def frames(self, episode_index: int = -1) -> Iterator[Frame]:
        for i in range(len(self)):
            yield self.frame(i, episode_index)
