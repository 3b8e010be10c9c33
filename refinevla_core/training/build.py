"""What a run trains with: the model (preset or previous checkpoint) frozen for selective transfer, the accelerator,
the optimizer and its schedule. Kept apart from the loop so each piece can be built (and checked) on its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from refinevla_core.config import ConfigError
from refinevla_core.model.checkpoint import load_checkpoint
from refinevla_core.model.configuration_refinevla import RefineVLAConfig
from refinevla_core.model.modeling_refinevla import RefineVLA
from refinevla_core.model.presets import build_from_preset, load_preset
from refinevla_core.training.config import TrainConfig
from refinevla_core.training.data import TrainingSample
from refinevla_core.training.freezing import FreezeReport, apply_lora, apply_selective_transfer, describe
from refinevla_core.training.tracking import accelerator_kwargs  # report_to: TensorBoard / W&B / trackio

REPO_ROOT = Path(__file__).resolve().parents[2]


# ---- the model -------------------------------------------------------------------------------------------------------
def build_model(config: TrainConfig) -> Any:
    """The RefineVLA to fine-tune: a preset (random init or its pretrained base), or a previous run's checkpoint."""
    overrides = {}
    if config.max_rationale_tokens is not None:
        overrides["max_rationale_tokens"] = config.max_rationale_tokens
    base = config.base_checkpoint
    local = refinevla_checkpoint_folder(base)
    if local is not None:
        return _from_refinevla_checkpoint(local, config, overrides)
    return build_from_preset(config.preset, target_order=config.target_order, base_checkpoint=base,
                             seed=config.seed, overrides=overrides or None)


def refinevla_checkpoint_folder(base: str | None) -> Path | None:
    """A base_checkpoint that is a checkpoint of this project: relative to the working directory or, for the
    shipped models/ (e.g. models/tiny-base), to the repository; None for a preset's pretrained base or hub id."""
    if not base:
        return None
    for folder in (Path(base), REPO_ROOT / base):
        if (folder / "refinevla_config.json").is_file():
            return folder
    return None


def _from_refinevla_checkpoint(path: Path, config: TrainConfig, overrides: dict[str, Any]) -> Any:
    """Stage 2 from stage 1: continue from a checkpoint written by this trainer (or save_checkpoint)."""
    loaded = load_checkpoint(path)
    changes = dict(overrides)
    if config.target_order is not None:
        changes["target_order"] = config.target_order
    if not changes:
        return loaded
    new_config = RefineVLAConfig.from_dict({**loaded.refinevla_config.to_dict(), **changes})
    loaded.processor.config = new_config
    return RefineVLA(loaded.vlm, loaded.processor, new_config)


def check_model_source(config: TrainConfig) -> None:
    """Unknown preset or missing base checkpoint folder -> ConfigError naming the choices, before any work."""
    base = config.base_checkpoint
    if refinevla_checkpoint_folder(base) is not None:
        return
    load_preset(config.preset)  # ConfigError: unknown model preset ..., choose one of [...]


def new_token_ids(model: Any) -> list[int]:
    """The ReFineVLA tokens added to the vocabulary: <act_000..>, <begin_action>, <begin_rationale>."""
    lay = model.processor.layout
    return [*range(lay.action_token_start, lay.action_token_end), lay.begin_action_id, lay.begin_rationale_id]


def freeze_for_training(model: Any, config: TrainConfig) -> FreezeReport:
    """Selective transfer (or the π0 family's own preparation), LoRA on top when enabled, gradient checkpointing;
    returns the report of what trains."""
    family_report = model.prepare_training(config) if hasattr(model, "prepare_training") else None  # π0 family
    report = family_report or apply_selective_transfer(model.vlm, config.freeze, new_token_ids(model))
    if config.lora.enabled and family_report is None:
        lora = config.lora
        model.vlm = apply_lora(model.vlm, report, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                               module_names=lora.target_modules)
        rows = describe(model.vlm)
        rows.frozen_layers, rows.num_layers = report.frozen_layers, report.num_layers
        rows.new_token_rows, rows.num_new_tokens = report.new_token_rows, report.num_new_tokens
        report = rows
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model.vlm)
    return report


def enable_gradient_checkpointing(vlm: Any) -> None:
    base = vlm.get_base_model() if hasattr(vlm, "get_base_model") else vlm
    # non-reentrant: frozen lower layers give inputs without requires_grad, which reentrant checkpoints drop
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x name
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class Collator:
    """Samples -> the processor's teacher-forcing batch (+ continuous actions for validation L1)."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, samples: list[TrainingSample]) -> dict[str, torch.Tensor]:
        actions = np.stack([s.action for s in samples]).astype(np.float32)
        batch = self.processor.training_batch(
            [s.image for s in samples], [s.instruction for s in samples], actions, [s.rationale for s in samples]
        )
        batch["actions"] = torch.from_numpy(actions)
        return batch


# ---- the accelerator, optimizer and schedule -------------------------------------------------------------------------
def make_accelerator(config: TrainConfig, output_dir: Path) -> Any:
    """The Accelerator for one device or DDP, with the run's trackers (training/fsdp.py adds FSDP to it)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState


    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        # a second run in the same process (tests, the benchmark) may change precision / device
        AcceleratorState._reset_state(reset_partial_state=True)  # noqa: SLF001 (no public reset)
    # cpu=True also on a machine without CUDA: that is what makes accelerate run several CPU processes (torchrun)
    # as one DDP job over gloo instead of as independent single-process runs
    cpu = config.device == "cpu" or not torch.cuda.is_available()
    return Accelerator(mixed_precision="bf16" if config.precision == "bf16" else "no", cpu=cpu,
                       **accelerator_kwargs(config.report_to, output_dir))


def check_distributed_type(accelerator: Any) -> None:
    """DeepSpeed and Megatron are refused with the alternatives named: the checkpoint export (new-token rows folded
    into the head, LoRA merged) works on whole parameters; one device, DDP and FSDP (training/fsdp.py gathers the
    full weights for the export) are supported."""
    kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type)).upper()
    if kind in ("DEEPSPEED", "MEGATRON_LM"):
        raise ConfigError(
            f"refinevla train runs on one device, with DDP or with FSDP; {kind} is not supported (its sharded "
            "parameters are not exported by this trainer). Launch with `accelerate launch --multi_gpu` (DDP) or "
            "`accelerate launch --config_file config/accelerate_fsdp.yaml` (FSDP, full fine-tuning) instead"
        )


def make_optimizer(model: Any, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW/SGD over the trainable parameters; no weight decay on biases and norms (1-D parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[config.optimizer](
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int) -> Any:
    from transformers import get_scheduler

    schedule = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[config.schedule]
    return get_scheduler(schedule, optimizer, num_warmup_steps=config.warmup_for(total_steps),
                         num_training_steps=total_steps)
