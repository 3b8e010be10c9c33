"""PolicyConfig: inference settings, torch-free so the ROS policy node can declare them as parameters without
importing torch (a node with a stand-in policy starts in a fraction of the time)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from refinevla_core.config import ConfigError

RationaleMode = Literal["action_only", "every_step", "every_n"]


@dataclass
class PolicyConfig:
    """Inference settings (the ROS policy node mirrors these as parameters, so no field is None)."""

    rationale_mode: RationaleMode = "every_n"
    rationale_every_n: int = 10
    seed: int = 0  # seeds sampling (do_sample); greedy decoding is deterministic anyway
    max_rationale_tokens: int = 0  # 0: the checkpoint's max_rationale_tokens
    do_sample: bool = False
    temperature: float = 1.0
    dtype: str = ""  # "": the checkpoint's dtype; or "float32", "bfloat16", "float16"
    torch_threads: int = 0  # torch.set_num_threads at load (0: leave torch's default)
    verify: Literal["auto", "size", "sha256"] = "auto"  # checkpoint file verification at load

    def __post_init__(self) -> None:
        if self.rationale_mode not in ("action_only", "every_step", "every_n"):
            raise ConfigError(
                f"rationale_mode {self.rationale_mode!r} is not one of ['action_only', 'every_step', 'every_n']"
            )
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
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
