"""RefineVLAPi0Config: how a transformers PI0 network is used as a ReFineVLA policy.

The network itself is described by transformers' `PI0Config` (config.json next to the weights, so the folder stays
loadable by `PI0ForConditionalGeneration.from_pretrained`); this config adds what ReFineVLA needs around it: where
the base comes from, the target order of the rationale, the prompt, how chunks are executed, and (for the random
presets) the sizes. Presets are config/model_pi0-*.yaml (`family: pi0`).

Target orders, as for the PaliGemma family:
  - "rationale_then_action": the rationale is generated into the VLM prefix before the action expert runs, so the
    chunk is conditioned on it (chain of thought);
  - "action_then_rationale": the expert sees image + prompt only (the rationale is an auxiliary target of the VLM);
    action-only inference costs nothing extra and a rationale can be generated after the chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from refinevla_core.config import ConfigError
from refinevla_core.model.configuration_refinevla import (
    BaseSource,
    Dtype,
    ModelConfigMixin,
    PatchGrid,
    TargetOrder,
    check_base_source,
)

PI0_CONFIG_NAME = "refinevla_pi0_config.json"
PI0_BASE_HUB_ID = "lerobot/pi0_base"
PALIGEMMA_TOKENIZER_HUB_ID = "google/paligemma-3b-pt-224"


@dataclass
class GemmaSpec:
    """A Gemma stack (the VLM's language model or the action expert); `extra` passes any other GemmaConfig key."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    head_dim: int = 16
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SiglipSpec(PatchGrid):
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 1
    num_attention_heads: int = 2
    patch_size: int = 14
    image_size: int = 112


@dataclass
class Pi0BaseSpec:
    """Where the π0 network comes from.

    - "random": built from `text`/`vision`/`expert` with random weights and the project's offline tokenizer (tests,
      CPU demo, benchmarks at real size without the download).
    - "pretrained": `pretrained` is a local folder or hub id holding PI0 weights (lerobot/pi0_base: LeRobot's key
      names, renamed by transformers at load); the tokenizer comes from `tokenizer` (PaliGemma's, a gated hub repo:
      accept the Gemma licence on its page, then `huggingface-cli download`), or from the folder itself when it
      holds tokenizer files (our own checkpoints do).
    """

    source: BaseSource = "random"
    pretrained: str | None = None
    tokenizer: str = PALIGEMMA_TOKENIZER_HUB_ID
    revision: str | None = None
    text: GemmaSpec = field(default_factory=GemmaSpec)
    vision: SiglipSpec = field(default_factory=SiglipSpec)
    expert: GemmaSpec = field(default_factory=lambda: GemmaSpec(hidden_size=32, intermediate_size=64))
    tokenizer_vocab_size: int = 1024

    def __post_init__(self) -> None:
        check_base_source(self.source, self.pretrained)
        if self.source == "random":
            t, e = self.text, self.expert
            if (t.num_hidden_layers, t.num_key_value_heads, t.head_dim) != (
                    e.num_hidden_layers, e.num_key_value_heads, e.head_dim):
                raise ConfigError(
                    "base.expert must have the text model's num_hidden_layers, num_key_value_heads and head_dim "
                    "(the action expert attends to the VLM's keys/values layer by layer)"
                )
            if self.vision.image_size % self.vision.patch_size:
                raise ConfigError("base.vision.image_size must be a multiple of patch_size")


@dataclass
class RefineVLAPi0Config(ModelConfigMixin):
    """How a PI0 network is used as the ReFineVLA policy (see the module docstring)."""

    family: Literal["pi0"] = "pi0"
    name: str = "pi0-tiny"
    base: Pi0BaseSpec = field(default_factory=Pi0BaseSpec)
    target_order: TargetOrder = "rationale_then_action"
    prompt_template: str = "{instruction}"
    max_rationale_tokens: int = 64
    chunk_size: int = 4
    max_state_dim: int = 32
    max_action_dim: int = 32
    num_inference_steps: int = 10
    execute_steps: int = 0  # actions of a chunk executed before re-planning (0: the whole chunk)
    dtype: Dtype = "float32"
    attn_implementation: str = "eager"

    def __post_init__(self) -> None:
        if self.family != "pi0":
            raise ConfigError(f"family must be 'pi0' for a π0 config, got {self.family!r}")
        self.check_prompt_template()
        checks = [
            (self.max_rationale_tokens >= 1, "max_rationale_tokens must be >= 1"),
            (self.chunk_size >= 1, "chunk_size must be >= 1"),
            (self.max_action_dim >= 7, "max_action_dim must be >= 7 (the Bridge action has 7 dimensions)"),
            (self.max_state_dim >= 1, "max_state_dim must be >= 1"),
            (self.num_inference_steps >= 1, "num_inference_steps must be >= 1"),
            (0 <= self.execute_steps <= self.chunk_size, f"execute_steps must be in 0..chunk_size={self.chunk_size}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"{message}, got {self!r}"[:300])

    @property
    def replan_every(self) -> int:
        return self.execute_steps or self.chunk_size


def is_pi0_config_file(path: str | Path) -> bool:
    """Whether a model preset YAML describes a π0 model (`family: pi0`)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and data.get("family") == "pi0"
