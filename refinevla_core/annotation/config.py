"""AnnotationConfig: every knob of `refinevla annotate` in one dataclass, mirrored by config/annotation.yaml.

The prompt template lives here (and in the YAML, which a test keeps identical), so a user changes what the teacher is
asked by editing a config file, never code. Values are checked when the config is built: a template placeholder typo
or a zero concurrency fails before the first (paid) request, with the valid choices named.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from refinevla_core.annotation import prompts
from refinevla_core.config import ConfigError

TeacherKind = Literal["sim", "openai", "hf"]
TEACHERS: tuple[str, ...] = ("sim", "openai", "hf")

DEFAULT_SYSTEM = """\
You annotate robot demonstrations for training a vision-language-action model. For one camera frame of a \
demonstration you explain, in four sections, the reasoning behind what the robot does next:
- observation: the objects in view (name each with its colour or shape; include the robot gripper),
- situation_analysis: the context and how far the task has progressed at this frame,
- spatial_reasoning: where the objects, the gripper and the target are relative to each other,
- task_planning: the next steps in logical order, down to position, rotation and gripper commands.
The demonstrated actions are ground truth: the plan must agree with them. Write 1-3 concrete sentences per section.
Reply with only a JSON object with exactly the keys "observation", "situation_analysis", "spatial_reasoning" and \
"task_planning", each a non-empty string."""

DEFAULT_USER = """\
Instruction: {instruction}
Frame {frame} of {last_frame} ({progress_percent}% through the demonstration); {image_note}.
The robot's next {num_future} demonstrated action(s) from this frame (robot base frame: x forward, y left, z up; \
gripper open/closed):
{future_actions}
In short, {motion_summary}.
Write the rationale for this frame as the JSON object described above."""

DEFAULT_REASK = """\
Your reply could not be used: {error}. Reply again with only a JSON object with the keys "observation", \
"situation_analysis", "spatial_reasoning" and "task_planning", each a non-empty string."""


@dataclass
class PromptConfig:
    """The teacher prompt: system message, per-frame user message (see prompts.USER_FIELDS), re-ask message."""

    system: str = DEFAULT_SYSTEM
    user: str = DEFAULT_USER
    reask: str = DEFAULT_REASK

    def __post_init__(self) -> None:
        try:
            prompts.check_template(self.system, (), "prompt.system")
            prompts.check_template(self.user, prompts.USER_FIELDS, "prompt.user")
            prompts.check_template(self.reask, prompts.REASK_FIELDS, "prompt.reask")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not self.user.strip():
            raise ConfigError("prompt.user is empty; it must at least name {instruction}")


@dataclass
class AnnotationConfig:
    """Teacher choice, scale controls (concurrency, rate limit, retries, every-k) and the prompt."""

    teacher: TeacherKind = "sim"
    model: str = ""  # openai: the served model name; hf: a local folder or hub id
    base_url: str = "https://api.openai.com/v1"  # any OpenAI-compatible server (Gemini, vLLM, Ollama)
    api_key_env: str = "OPENAI_API_KEY"  # the environment variable holding the key; "" = send no key
    every_k: int = 1  # annotate frames 0, k, 2k, ...; the frames between carry the rationale forward on export
    future_actions: int = 5  # demonstrated actions shown to the teacher, starting at the annotated frame
    image_offsets: list[int] = field(default_factory=lambda: [0])  # images shown: current frame (+ later frames)
    concurrency: int = 8  # requests in flight (openai teacher; local teachers run one at a time)
    requests_per_minute: float = 0.0  # 0 = no limit; set it to your API quota
    max_retries: int = 6  # per request, on 429 / 5xx / timeouts / dropped connections
    backoff_base_s: float = 1.0  # exponential backoff base with full jitter; Retry-After is honoured
    backoff_max_s: float = 60.0
    timeout_s: float = 120.0  # per HTTP request
    max_reasks: int = 2  # re-asks after an invalid reply; then the frame is recorded as failed
    json_mode: Literal["auto", "on", "off"] = "auto"  # response_format json_object; auto drops it if refused
    temperature: float = 0.2
    max_tokens: int = 800
    hf_device: str = "cpu"  # hf teacher: torch device
    hf_dtype: str = "auto"  # hf teacher: float32 / bfloat16 / float16 / auto
    prompt: PromptConfig = field(default_factory=PromptConfig)

    def __post_init__(self) -> None:
        positive = {"every_k": self.every_k, "future_actions": self.future_actions, "concurrency": self.concurrency,
                    "max_tokens": self.max_tokens}
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        non_negative = {"requests_per_minute": self.requests_per_minute, "max_retries": self.max_retries,
                        "backoff_base_s": self.backoff_base_s, "backoff_max_s": self.backoff_max_s,
                        "max_reasks": self.max_reasks, "temperature": self.temperature}
        for name, value in non_negative.items():
            if value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value}")
        if self.timeout_s <= 0:
            raise ConfigError(f"timeout_s must be > 0, got {self.timeout_s}")
        if not self.image_offsets or any(o < 0 for o in self.image_offsets):
            raise ConfigError(f"image_offsets must be a non-empty list of steps >= 0 (0 = current frame), "
                              f"got {self.image_offsets}")
        if self.teacher not in TEACHERS:
            raise ConfigError(f"teacher {self.teacher!r} is unknown; choose one of {list(TEACHERS)}")


def default_config_path() -> Path | None:
    """config/annotation.yaml of a source checkout, else of the installed ROS package share; None if neither."""
    candidates = [
        Path(__file__).resolve().parents[2] / "config" / "annotation.yaml",
        Path(sys.prefix) / "share" / "refinevla" / "config" / "annotation.yaml",
    ]
    return next((p for p in candidates if p.is_file()), None)
