"""RefineVLAConfig: what a ReFineVLA model is, beyond the weights — base model, target order, prompt, token layout.

Why a config of our own next to the HF `config.json`: the HF config describes the PaliGemma network (so the
checkpoint folder stays loadable by plain transformers); this one describes how the network is *used* as a VLA —
which order rationale and action tokens come in, the prompt, how many action bins, and which token ids the
checkpoint was trained with (checked against the tokenizer and the model at load: a mismatch is a clear error, not
silently wrong actions). It is saved as `refinevla_config.json`; presets are YAML files in config/ (model_<name>.yaml)
with the same keys.

Target orders (the paper's rationale is a training target; the order decides what inference costs):
  - "rationale_then_action": <rationale> <begin_action> a1..a7 — chain of thought, the rationale conditions the
    action; action-only inference feeds <begin_action> right after the prompt (or a cached rationale before it).
  - "action_then_rationale": <begin_action> a1..a7 <begin_rationale> <rationale> — the rationale is an auxiliary
    target: action-only inference costs nothing extra and the rationale can be generated after the action.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from refinevla_core.config import ConfigError, from_dict, load_config, to_dict

TargetOrder = Literal["rationale_then_action", "action_then_rationale"]
TARGET_ORDERS: tuple[str, ...] = ("rationale_then_action", "action_then_rationale")
Dtype = Literal["float32", "bfloat16", "float16"]
BaseSource = Literal["random", "pretrained"]

REFINEVLA_CONFIG_NAME = "refinevla_config.json"
ACTION_TOKEN_FORMAT = "<act_{:03d}>"
BEGIN_ACTION_TOKEN = "<begin_action>"
BEGIN_RATIONALE_TOKEN = "<begin_rationale>"
ConfigT = TypeVar("ConfigT", bound="ModelConfigMixin")


class ModelConfigMixin:
    """What every model family's config does the same way (RefineVLAConfig, RefineVLAPi0Config): the prompt, and
    dict / JSON / YAML round trips with the project's strict loader (unknown keys name the choices)."""

    prompt_template: str

    def check_prompt_template(self) -> None:
        if "{instruction}" not in self.prompt_template:
            raise ConfigError(f"prompt_template {self.prompt_template!r} must contain '{{instruction}}'")

    def prompt(self, instruction: str) -> str:
        return self.prompt_template.format(instruction=instruction.strip())

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls: type[ConfigT], data: dict[str, Any], where: str | None = None) -> ConfigT:
        return from_dict(cls, data, where=where or cls.__name__)

    @classmethod
    def from_yaml(cls: type[ConfigT], path: str | Path, overrides: dict[str, Any] | None = None) -> ConfigT:
        return load_config(cls, path, overrides)


def check_base_source(source: str, pretrained: str | None) -> None:
    """A pretrained base needs somewhere to come from (both families' base specs)."""
    if source == "pretrained" and not pretrained:
        raise ConfigError("base.source is 'pretrained' but base.pretrained (a local folder or hub id) is empty")


class PatchGrid:
    """What both vision specs derive from their image and patch sizes."""

    image_size: int
    patch_size: int

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class TextSpec:
    """Gemma2 language model sizes (random-init presets). `extra` passes any other Gemma2Config key."""

    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    vocab_size: int | None = None  # None: the tokenizer's length rounded up to a multiple of 64
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class VisionSpec(PatchGrid):
    """SigLIP vision tower sizes (random-init presets). `extra` passes any other SiglipVisionConfig key."""

    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    patch_size: int = 14
    image_size: int = 112
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class BaseModelSpec:
    """Where the network comes from.

    - source "random": built from `text`/`vision` with random weights and a BPE tokenizer trained offline on the
      project's own corpus (`tokenizer_vocab_size` entries before PaliGemma's <image>/<loc>/<seg> tokens). Needs no
      network and no download: the tiny/mid presets and the random real-size benchmark preset.
    - source "pretrained": `pretrained` is a local folder or a hub id of a PaliGemma / PaliGemma2 checkpoint
      (e.g. google/paligemma2-3b-pt-224); weights, tokenizer and image processor come from it (safetensors only).
      Hub ids need network access or a filled HF cache (HF_HUB_OFFLINE=1 refuses downloads).
    """

    source: BaseSource = "random"
    pretrained: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    text: TextSpec = field(default_factory=TextSpec)
    vision: VisionSpec = field(default_factory=VisionSpec)
    tokenizer_vocab_size: int = 1024
    projection_dim: int | None = None  # None: the text hidden size (PaliGemma's projector maps vision -> text)
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        check_base_source(self.source, self.pretrained)
        if self.source == "random" and self.tokenizer_vocab_size < 300:
            raise ConfigError(
                "base.tokenizer_vocab_size must be >= 300 (256 byte tokens + specials), "
                f"got {self.tokenizer_vocab_size}"
            )
        if self.vision.image_size % self.vision.patch_size:
            raise ConfigError(
                f"base.vision.image_size {self.vision.image_size} is not a multiple of "
                f"patch_size {self.vision.patch_size}"
            )


@dataclass
class TokenLayout:
    """Token ids a checkpoint was built with; written at build time, compared with the tokenizer at load."""

    vocab_len: int  # len(tokenizer)
    image_token_id: int
    num_image_tokens: int
    bos_id: int
    eos_id: int
    pad_id: int
    action_token_start: int  # <act_000>; the n_action_bins action tokens are contiguous
    n_action_bins: int
    begin_action_id: int
    begin_rationale_id: int

    @property
    def action_token_end(self) -> int:  # exclusive
        return self.action_token_start + self.n_action_bins

    def mismatches(self, other: TokenLayout) -> list[str]:
        return [
            f"{name}: {getattr(self, name)} vs {getattr(other, name)}"
            for name in self.__dataclass_fields__
            if getattr(self, name) != getattr(other, name)
        ]


@dataclass
class RefineVLAConfig(ModelConfigMixin):
    """How a PaliGemma network is used as the ReFineVLA policy (see the module docstring)."""

    name: str = "tiny"
    base: BaseModelSpec = field(default_factory=BaseModelSpec)
    target_order: TargetOrder = "rationale_then_action"
    prompt_template: str = "{instruction}"
    n_action_bins: int = 256
    max_rationale_tokens: int = 96  # training targets are truncated to this; generation stops there
    dtype: Dtype = "float32"
    attn_implementation: str = "eager"  # Gemma2 has no SDPA; eager is also what attention maps need
    tokens: TokenLayout | None = None  # filled when the model is built

    def __post_init__(self) -> None:
        if self.target_order not in TARGET_ORDERS:
            raise ConfigError(f"target_order {self.target_order!r} is not one of {list(TARGET_ORDERS)}")
        self.check_prompt_template()
        if not 2 <= self.n_action_bins <= 4096:
            raise ConfigError(f"n_action_bins must be in 2..4096, got {self.n_action_bins}")
        if self.max_rationale_tokens < 1:
            raise ConfigError(f"max_rationale_tokens must be >= 1, got {self.max_rationale_tokens}")
