"""TrainConfig: every knob of `refinevla train` in one dataclass, loaded from config/train_<preset>.yaml.

Values are checked when the config is built (before a model is built or a dataset opened), so a typo or an
impossible combination fails in a second with the key and the valid choices named, not an hour into a run.
Checks that need the model (K beyond the layer count) or the dataset (missing statistics) happen in freezing.py and
data.py, still before the first step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from refinevla_core.config import ConfigError, load_config
from refinevla_core.training.tracking import tracker_names

TargetOrder = Literal["rationale_then_action", "action_then_rationale"]
NewTokenRows = Literal["head", "tied", "none"]
Precision = Literal["fp32", "bf16"]
Schedule = Literal["cosine", "linear", "constant"]
Optimizer = Literal["adamw", "sgd"]
ActionStatsSource = Literal["auto", "base", "dataset"]

# The preset YAML files shipped in config/ (refinevla train --config config/train_<name>.yaml).
CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"


@dataclass
class FreezeConfig:
    """Selective transfer: what stays at its pre-trained value.

    `language_layers` is K, the lower language-model layers to freeze, given as
      - an integer count: 6 freezes layers 0..5;
      - a fraction in [0, 1] (a float, or a string like "75%"): 0.75 freezes round(0.75 * N) lower layers;
      - any other string: a regular expression searched in each layer's module name
        (e.g. "layers\\.([0-9]|1[0-7])$"); matching layers are frozen.
    `new_token_rows` says how the rows of the new action tokens learn while the embeddings are frozen
    (see freezing.py: the tied-embedding pitfall):
      - "head": only the output-head rows of those tokens train; at save time the head is written untied. No gradient
        reaches the frozen lower layers. The default.
      - "tied": one trainable row per token shared by the input embedding and the head (keeps the tie; costs a
        backward pass through every frozen layer, about 2x the memory on the mid preset).
      - "none": the rows stay frozen (only sensible when the action tokens reuse pre-trained vocabulary rows).
    """

    vision: bool = True
    projector: bool = True
    embeddings: bool = True
    language_layers: Any = 0.75
    new_token_rows: NewTokenRows = "head"

    def __post_init__(self) -> None:
        spec = self.language_layers
        if isinstance(spec, bool) or not isinstance(spec, (int, float, str)):
            raise ConfigError(
                f"freeze.language_layers: {spec!r} is not a layer count (6), a fraction (0.75 or \"75%\") "
                "or a layer-name regex"
            )
        if isinstance(spec, int) and spec < 0:
            raise ConfigError(f"freeze.language_layers: a count must be >= 0, got {spec}")
        if isinstance(spec, float) and not 0.0 <= spec <= 1.0:
            raise ConfigError(
                f"freeze.language_layers: a fraction must be in [0, 1], got {spec}; "
                "write an integer to give a layer count"
            )
        if isinstance(spec, str):
            text = spec.strip()
            if text.endswith("%"):
                try:
                    pct = float(text[:-1])
                except ValueError:
                    raise ConfigError(f"freeze.language_layers: {spec!r} is not a percentage like \"75%\"") from None
                if not 0.0 <= pct <= 100.0:
                    raise ConfigError(f"freeze.language_layers: {spec!r} is outside 0%..100%")
            else:
                try:
                    re.compile(text)
                except re.error as e:
                    raise ConfigError(f"freeze.language_layers: {spec!r} is not a valid regex ({e})") from None


@dataclass
class LoRAConfig:
    """peft LoRA on the unfrozen language layers only (the vision tower is never touched)."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    save_adapter: bool = True  # also write the adapter alone (peft format) next to the merged checkpoint

    def __post_init__(self) -> None:
        if self.r <= 0 or self.alpha <= 0:
            raise ConfigError(f"lora: r and alpha must be > 0, got r={self.r} alpha={self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        bad = [m for m in self.target_modules if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", m)]
        if not self.target_modules or bad:
            raise ConfigError(
                f"lora.target_modules must be plain module names like q_proj, got {self.target_modules!r}"
            )


@dataclass
class TrainConfig:
    """One training run. `preset` builds a random-init model (tiny/mid) or names the real-size preset whose weights
    come from `base_checkpoint` (a local folder or hub id)."""

    preset: str = "tiny"
    base_checkpoint: str | None = None
    target_order: TargetOrder | None = None  # None: the preset's / base checkpoint's own order
    dataset: str = ""
    output_dir: str = "runs/train"

    # the joint loss and the data
    lambda_rationale: float = 0.3
    rationale_dropout: float = 0.2  # share of training samples shown without their rationale
    val_fraction: float = 0.1  # share of episodes held out for validation (at least one when there are 2+)
    val_max_frames: int = 256
    max_rationale_tokens: int | None = None  # truncate long rationales (None: the processor's default)
    # which action statistics define the action bins: "base" keeps the base checkpoint's (its action tokens keep
    # their meaning, as openpi reloads a base's norm stats), "dataset" fits them on this training split, "auto" =
    # base when base_checkpoint carries statistics (a checkpoint of this project), else dataset
    action_stats: ActionStatsSource = "auto"

    # what trains
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    # optimisation
    batch_size: int = 8  # per device, per micro-batch
    grad_accumulation: int = 1
    max_steps: int | None = 1000  # optimizer steps; None: derive from epochs
    epochs: float | None = None
    lr: float = 1e-4
    weight_decay: float = 0.0
    # sgd: plain gradient descent, for equality tests across process counts (Adam's normalisation turns reduction-
    # order rounding on tiny gradients into lr-sized steps; SGD keeps it at rounding size)
    optimizer: Optimizer = "adamw"
    max_grad_norm: float = 1.0
    schedule: Schedule = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps == 0
    precision: Precision = "fp32"
    gradient_checkpointing: bool = False
    seed: int = 0

    # bookkeeping
    log_every: int = 10
    eval_every: int = 200
    save_every: int = 200
    keep_checkpoints: int = 2
    resume: str = "auto"  # "auto": continue from the newest checkpoint in output_dir; "never"; or a checkpoint path
    device: str = "auto"  # "auto" (accelerate's choice), "cpu"
    num_workers: int = 0
    torch_threads: int | None = None  # torch.set_num_threads for the run (None: leave torch's default)
    progress_bar: bool = True
    report_to: str = "none"  # none | tensorboard | wandb | trackio, comma-separated (training/tracking.py)

    def __post_init__(self) -> None:
        checks = [
            (self.lambda_rationale >= 0.0,
             f"lambda_rationale must be >= 0 (0 = action-only), got {self.lambda_rationale}"),
            (0.0 <= self.rationale_dropout <= 1.0,
             f"rationale_dropout must be in [0, 1], got {self.rationale_dropout}"),
            (0.0 <= self.val_fraction < 1.0, f"val_fraction must be in [0, 1), got {self.val_fraction}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.grad_accumulation >= 1, f"grad_accumulation must be >= 1, got {self.grad_accumulation}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (0.0 <= self.warmup_ratio < 1.0, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}"),
            (self.log_every >= 1 and self.eval_every >= 1 and self.save_every >= 1,
             "log_every, eval_every and save_every must be >= 1"),
            (self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}"),
            (self.val_max_frames >= 1, f"val_max_frames must be >= 1, got {self.val_max_frames}"),
            (self.device in ("auto", "cpu"), f"device must be 'auto' or 'cpu', got {self.device!r} "
             "(use `accelerate launch` / CUDA_VISIBLE_DEVICES to pick GPUs)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.max_steps is None and self.epochs is None:
            raise ConfigError("give max_steps or epochs (both are unset)")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"epochs must be > 0, got {self.epochs}")
        if self.max_steps is not None and self.epochs is not None:
            raise ConfigError("give max_steps or epochs, not both (set the other to null)")
        tracker_names(self.report_to)  # ConfigError naming the valid trackers
        if self.resume not in ("auto", "never") and not self.resume.strip():
            raise ConfigError("resume must be 'auto', 'never' or a checkpoint path")

    def warmup_for(self, total_steps: int) -> int:
        return self.warmup_steps if self.warmup_steps > 0 else round(self.warmup_ratio * total_steps)


# Keys whose change makes a checkpoint of one run unfit to continue another (resume refuses and says which).
RESUME_CRITICAL_KEYS = (
    "preset", "base_checkpoint", "target_order", "dataset", "lambda_rationale", "rationale_dropout", "val_fraction",
    "max_rationale_tokens", "action_stats", "freeze", "lora", "batch_size", "grad_accumulation", "lr", "weight_decay",
    "optimizer", "schedule",
    "warmup_steps", "warmup_ratio", "precision", "seed",
)


def load_train_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """TrainConfig from a YAML file plus `key=value` overrides (dotted for nested: freeze.language_layers=6)."""
    return load_config(TrainConfig, path, overrides)
