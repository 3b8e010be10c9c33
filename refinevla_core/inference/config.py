"""Inference settings, torch-free so the ROS policy node can declare them as parameters without importing torch (a
node with a stand-in policy starts in a fraction of the time).

- PolicyConfig: how a checkpoint's Policy decodes (rationale mode, sampling, dtype, threads).
- RunnerConfig: which policy to load and the rules PolicyRunner applies around it (control rate, stale images,
  safety); the policy node's parameters are these plus its ROS-only fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from refinevla_core.config import ConfigError
from refinevla_core.safety import SafetyConfig

# action_only / every_step / every_n: the rationale (if any) is written inside predict(), before it returns.
# streaming: action first; the rationale of a due step finishes in the background (action_then_rationale models).
# async: actions every step on the cached rationale; a background worker refreshes it on the latest image.
RationaleMode = Literal["action_only", "every_step", "every_n", "streaming", "async"]
RATIONALE_MODES: tuple[str, ...] = get_args(RationaleMode)


@dataclass
class PolicyConfig:
    """Inference settings (the ROS policy node mirrors these as parameters, so no field is None)."""

    rationale_mode: RationaleMode = "every_n"
    rationale_every_n: int = 10  # every_n, streaming, async: a fresh rationale at most every n steps
    seed: int = 0  # seeds sampling (do_sample); greedy decoding is deterministic anyway
    max_rationale_tokens: int = 0  # 0: the checkpoint's max_rationale_tokens
    do_sample: bool = False
    temperature: float = 1.0
    dtype: str = ""  # "": the checkpoint's dtype; or "float32", "bfloat16", "float16"
    torch_threads: int = 0  # torch.set_num_threads at load (0: leave torch's default)
    verify: Literal["auto", "size", "sha256"] = "auto"  # checkpoint file verification at load
    execute_steps: int = 0  # π0 checkpoints: actions of a chunk executed before re-planning (0: the checkpoint's)

    def __post_init__(self) -> None:
        if self.rationale_mode not in RATIONALE_MODES:
            raise ConfigError(f"rationale_mode {self.rationale_mode!r} is not one of {list(RATIONALE_MODES)}")
        if self.rationale_every_n < 1:
            raise ConfigError(f"rationale_every_n must be >= 1, got {self.rationale_every_n}")
        if self.max_rationale_tokens < 0:
            raise ConfigError(
                f"max_rationale_tokens must be >= 1 (or 0: the checkpoint's), got {self.max_rationale_tokens}"
            )
        if self.dtype not in ("", "float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype {self.dtype!r} is not one of '', 'float32', 'bfloat16', 'float16'")
        if self.torch_threads < 0:
            raise ConfigError(f"torch_threads must be >= 0 (0: torch's default), got {self.torch_threads}")
        if self.execute_steps < 0:
            raise ConfigError(f"execute_steps must be >= 0 (0: the checkpoint's), got {self.execute_steps}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")


@dataclass
class RunnerConfig:
    """Which policy to run and the rules around it (refinevla_core.inference.runner.PolicyRunner)."""

    checkpoint: str = ""  # a checkpoint folder for Policy.from_checkpoint
    policy_factory: str = ""  # or "package.module:callable" returning an object with predict/reset
    device: str = "cpu"
    control_rate_hz: float = 5.0  # 0: one step per new image stamp (lock-step with a simulator or a benchmark)
    image_timeout_s: float = 1.0  # stale-image watchdog: arrival, repeated stamps and stamp age
    # stamps older than image_timeout_s + this on the node clock hold (rate mode): room for the camera's clock
    # being behind the node's (NTP/PTP-synchronised machines: milliseconds); raise it for an unsynchronised camera
    clock_offset_tolerance_s: float = 0.5
    max_instruction_chars: int = 2000
    policy: PolicyConfig = field(default_factory=PolicyConfig)  # rationale mode, threads, dtype... (checkpoint only)
    safety: SafetyConfig = field(default_factory=SafetyConfig)

    def __post_init__(self) -> None:
        if self.control_rate_hz < 0:
            raise ValueError(f"control_rate_hz must be >= 0 (0 = a step per new image); got {self.control_rate_hz}")
        if self.image_timeout_s <= 0:
            raise ValueError(f"image_timeout_s must be positive; got {self.image_timeout_s}")
        if self.clock_offset_tolerance_s < 0:
            raise ValueError(f"clock_offset_tolerance_s must be >= 0; got {self.clock_offset_tolerance_s}")
        if self.max_instruction_chars < 1:
            raise ValueError(f"max_instruction_chars must be >= 1; got {self.max_instruction_chars}")

    @property
    def lock_step(self) -> bool:
        """One step per new image stamp (control_rate_hz 0): a re-sent image is the simulator waiting, not new."""
        return self.control_rate_hz == 0
