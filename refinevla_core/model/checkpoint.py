"""ReFineVLA checkpoints: one HF-style folder holding everything inference needs, written atomically, verified on load.

Why: a policy is only usable with the exact weights, tokenizer, image processor, action statistics and token layout
it was trained with; shipping them separately is how "unnorm_key" guessing and tokenizer/model mismatches happen.

    <dir>/config.json, model.safetensors (or shards + index)   HF PaliGemma weights: `from_pretrained`-loadable
    <dir>/tokenizer.json, tokenizer_config.json, processor_config.json, ...   HF PaliGemmaProcessor files
    <dir>/stats.json                                        action statistics (refinevla_core.data.stats)
    <dir>/refinevla_config.json                             RefineVLAConfig incl. the token layout
    <dir>/<extra files>                                     e.g. the training config and metrics
    <dir>/refinevla_checkpoint.json                         manifest: every file's size and sha256; written last

Saving writes a sibling temp folder and renames it into place, so a killed save never leaves a half checkpoint under
the final name. Loading checks the manifest (missing/truncated/corrupt files), then that tokenizer, model and token
layout agree, and raises CheckpointError naming the problem and the fix. Weights are safetensors only (no pickle);
`trust_remote_code` is never used for our own checkpoints (see adapters.py for SpatialVLA/OpenVLA).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from refinevla_core.data.stats import ActionStats
from refinevla_core.model.checkpoint_format import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    HASH_LIMIT_BYTES,
    MANIFEST_NAME,
    CheckpointError,
    Verify,
    checkpoint_files,
    file_sha256,
    seal_checkpoint,
    verify_checkpoint,
)
from refinevla_core.model.checkpoint_refinevla import save_refinevla_checkpoint
from refinevla_core.model.configuration_refinevla import RefineVLAConfig
from refinevla_core.model.modeling_refinevla import RefineVLA
from refinevla_core.model.pi0.checkpoint_pi0 import is_pi0_checkpoint, save_pi0_checkpoint
from refinevla_core.model.pi0.modeling_pi0 import RefineVLAPi0

__all__ = [  # the checkpoint API, for both families
    "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "HASH_LIMIT_BYTES", "MANIFEST_NAME", "CheckpointError", "Verify",
    "checkpoint_files", "file_sha256", "load_checkpoint", "save_checkpoint", "save_tied_weights_quietly",
    "seal_checkpoint", "verify_checkpoint",
]


def save_checkpoint(  # noqa: PLR0917 (the positional order is the API the trainer codes against)
    directory: str | Path,
    model: Any,
    processor: Any,
    stats: ActionStats,
    refinevla_config: RefineVLAConfig,
    extra_files: dict[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint folder atomically and return its path.

    `model` is a RefineVLA or its HF PaliGemmaForConditionalGeneration (merge peft adapters first);
    `processor` a RefineVLAProcessor; `stats` the training data's ActionStats (required: a checkpoint without
    statistics cannot un-normalise actions); `extra_files` maps file names to text (str), bytes, a JSON-able object or a
    pathlib.Path to copy. An existing *checkpoint* at `directory` is replaced; any other existing folder is refused.
    """
    if getattr(refinevla_config, "family", None) == "pi0":
        return save_pi0_checkpoint(directory, model, processor, stats, refinevla_config, extra_files)
    return save_refinevla_checkpoint(directory, model, processor, stats, refinevla_config, extra_files)


def save_tied_weights_quietly(accelerator: Any) -> None:
    """Make `accelerator.save_state` write the training model with safetensors' `save_model`, which stores each
    group of tied tensors once and is what `load_model` (accelerate's load_state) expects back.

    Why: accelerate's own safetensors save drops the tied `lm_head.weight` by hand and logs "Removed shared tensor
    ... check by verifying that you don't receive any warning while reloading" at every checkpoint, an alarm about
    nothing. The file name and keys stay accelerate's (model.safetensors), so older checkpoints still resume.
    FSDP/DeepSpeed keep their own sharded saves.
    """
    from accelerate.utils import DistributedType
    from safetensors.torch import save_model

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        return

    def save_models(models: list[Any], weights: list[Any], output_dir: str) -> None:
        if accelerator.is_main_process:
            for i, model in enumerate(models):
                save_model(model, str(Path(output_dir) / f"model{f'_{i}' if i else ''}.safetensors"))
        weights.clear()  # written above: accelerate saves the optimizer, scheduler and RNG states only

    accelerator.register_save_state_pre_hook(save_models)


def load_checkpoint(
    directory: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | None = None,
    verify: Verify = "auto",
    attn_implementation: str | None = None,
) -> Any:
    """Load a RefineVLA (model, processor, config, statistics) from a folder written by save_checkpoint; a π0
    checkpoint loads as a RefineVLAPi0."""
    if is_pi0_checkpoint(directory):
        return RefineVLAPi0.from_pretrained(directory, device=device, dtype=dtype, verify=verify)
    return RefineVLA.from_pretrained(directory, device=device, dtype=dtype, verify=verify,
                                     attn_implementation=attn_implementation)
