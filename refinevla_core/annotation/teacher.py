"""The one interface every teacher implements, so the runner, store and CLI never care which teacher writes.

A teacher turns a `FrameRequest` (instruction, image(s), demonstrated future actions, privileged state) into a
`TeacherReply`: a validated `Rationale`, or a per-frame failure with its reason (stored as failed, retried only when
asked). Problems that would fail every frame (server down, bad API key, model not found, missing privileged state)
raise `TeacherError` instead, with the fix in the message, so a run stops rather than marking 100k frames failed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from refinevla_core.annotation.prompts import PromptValues
from refinevla_core.rationale import Rationale


class TeacherError(RuntimeError):
    """A run-level problem (configuration, connectivity, credentials, unusable dataset): the message names the fix."""


@dataclass(frozen=True)
class FrameRequest:
    """One frame to annotate, with everything any teacher may use."""

    episode: int
    frame: int
    num_frames: int
    instruction: str
    task: str
    future_actions: np.ndarray  # (k, 7): the demonstrated actions from this frame on (fewer near the end)
    images: tuple[np.ndarray, ...] = ()  # HxWx3 uint8: the current frame first, then later frames (image_offsets)
    image_offsets: tuple[int, ...] = (0,)  # the offsets of `images` after clipping to the episode
    state: dict[str, Any] | None = None  # privileged simulator state (see the sim teacher for the contract)

    def prompt_values(self) -> PromptValues:
        gripper_now = None
        if self.state and isinstance(self.state.get("gripper"), dict):
            opening = self.state["gripper"].get("opening")
            gripper_now = float(opening) if isinstance(opening, (int, float)) else None
        return PromptValues(
            instruction=self.instruction, task=self.task, frame=self.frame, num_frames=self.num_frames,
            future_actions=self.future_actions, image_offsets=self.image_offsets, gripper_now=gripper_now,
        )


@dataclass
class TeacherReply:
    """What came back for one frame: a rationale, or `error` saying why the frame failed."""

    rationale: Rationale | None
    reply: str = ""  # the last raw reply text (kept for failed frames, so a human can see what went wrong)
    error: str = ""
    calls: int = 0  # model calls made (re-asks included; transport retries are not calls that produced a reply)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.rationale is not None


class Teacher(ABC):
    """Writes rationales. Subclasses set the class attributes and implement `annotate`."""

    kind: str = ""
    needs_images: bool = True  # the runner loads images only for teachers that look at them
    needs_state: bool = False  # the runner checks privileged state before the run for teachers that need it
    concurrency: int = 1  # requests the runner keeps in flight (threads); local models run one at a time

    @property
    @abstractmethod
    def name(self) -> str:
        """Identity in the store key, e.g. 'openai:gemini-2.0-flash' or 'sim:v2'."""

    @property
    @abstractmethod
    def prompt_hash(self) -> str:
        """Digest of what this teacher is asked; a changed prompt means new annotations."""

    def check(self) -> None:  # noqa: B027 - optional hook
        """Preflight before anything is written: reachability, credentials, model loading. Raises TeacherError."""

    def check_episode(self, info: dict[str, Any], where: str) -> None:  # noqa: B027 - optional hook
        """Preflight one episode's metadata (episodes/NNNNNN.json). Raises TeacherError naming the fix."""

    @abstractmethod
    def annotate(self, request: FrameRequest) -> TeacherReply:
        """Annotate one frame. Per-frame failures return a reply with `error`; run-level ones raise TeacherError."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections / model memory."""
