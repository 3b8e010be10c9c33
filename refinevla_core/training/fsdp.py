"""FSDP through accelerate: full fine-tuning of a model whose weights + AdamW state do not fit one GPU per process.

Launch: `accelerate launch --config_file config/accelerate_fsdp.yaml -m refinevla_core train --config ...`.
accelerate then wraps the model with FSDP2 (`fully_shard`: each process holds 1/N of every parameter, gradient and
optimizer state, decoder layers all-gathered one at a time), keeps fp32 master weights under bf16 mixed precision,
and save_state/load_state write the sharded trainer state for resuming. Two things are ours:

  - the exported checkpoint: every process takes part in gathering the full state dict, and the main process loads it
    into a freshly built model with the run's freezing applied, then writes the normal checkpoint folder (new-token
    rows folded into the head) — the same folder a one-process run writes;
  - CPU processes: accelerate selects FSDP only for accelerators; with ACCELERATE_USE_FSDP set (what `accelerate
    launch --config_file config/accelerate_fsdp.yaml` exports) and CPU processes (gloo), the same FSDP2 plugin is
    applied, so the sharded code path runs in CI.
LoRA is refused under FSDP (merging adapters needs whole weights; LoRA already fits DDP).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from refinevla_core.config import ConfigError
from refinevla_core.model.checkpoint import save_checkpoint
from refinevla_core.training.build import build_model, new_token_ids
from refinevla_core.training.freezing import apply_selective_transfer, export_for_saving


def fsdp_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def is_fsdp(accelerator: Any) -> bool:
    return str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type)).upper() == "FSDP"


def prepare_fsdp(accelerator: Any, config: Any) -> Any:
    """Turn FSDP on for CPU processes when it was requested (see the module docstring); refuse LoRA under FSDP."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if fsdp_requested() and accelerator.distributed_type == DistributedType.MULTI_CPU:
        plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables accelerate launch exports
        if accelerator.mixed_precision != "no":
            plugin.set_mixed_precision(accelerator.mixed_precision)
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
        # as accelerate records its own choice
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # noqa: SLF001 (accelerate: no public setter)
    if is_fsdp(accelerator) and config.lora.enabled:
        raise ConfigError("lora.enabled is not supported with FSDP (adapters are merged on whole weights); LoRA "
                          "trains little enough for DDP: launch with `accelerate launch --multi_gpu` instead")
    return accelerator


def gather_full_state_dict(accelerator: Any, model: Any) -> dict[str, Any] | None:
    """Under FSDP: the full (unsharded) state dict on the main process — a collective, every process must call it.
    None when the run is not sharded."""
    if not is_fsdp(accelerator):
        return None
    return accelerator.get_state_dict(model)


def save_from_full_state(trainer: Any, directory: Path, state: dict[str, Any]) -> None:
    """Main process: load the gathered weights into a fresh model frozen like the run's, and write the checkpoint."""
    cfg = trainer.config
    fresh = build_model(cfg)
    fresh.processor.set_action_stats(trainer.stats)
    if hasattr(fresh, "prepare_training"):
        fresh.prepare_training(cfg)
    else:
        apply_selective_transfer(fresh.vlm, cfg.freeze, new_token_ids(fresh))
    weights = {k.removeprefix("vlm."): v for k, v in state.items() if k.startswith("vlm.")}
    missing, unexpected = fresh.vlm.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k not in _tied_names(fresh.vlm)]
    if missing or unexpected:
        raise RuntimeError(f"the gathered FSDP state does not fit the model: missing {missing[:5]}, unexpected "
                           f"{unexpected[:5]}")
    with export_for_saving(fresh.vlm) as plain:
        save_checkpoint(directory, plain, fresh.processor, trainer.stats, fresh.refinevla_config,
                        extra_files=trainer.checkpoint_extra_files())


def _tied_names(model: Any) -> set[str]:
    """Parameter names that alias another parameter (a tied head): the state dict carries them once."""
    seen: dict[int, str] = {}
    tied = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        else:
            seen[id(p)] = name
    return tied
