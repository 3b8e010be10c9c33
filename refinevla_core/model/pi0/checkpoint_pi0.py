"""π0 ReFineVLA checkpoints: the same folder contract as the PaliGemma family (refinevla_core.model.checkpoint).

    <dir>/config.json, model.safetensors      transformers PI0 (PI0ForConditionalGeneration.from_pretrained loads it)
    <dir>/tokenizer*, processor_config.json   PI0Processor files (tokenizer + SigLIP image processor)
    <dir>/stats.json                          the 7-D Bridge action statistics (mean/std normalise, min/max clip)
    <dir>/refinevla_pi0_config.json           RefineVLAPi0Config (target order, chunking, prompt)
    <dir>/refinevla_checkpoint.json           manifest (sizes + sha256), written last; verified at load

Written to a temp folder and renamed into place, so a killed save never leaves a half checkpoint under the name.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from refinevla_core.data.stats import STATS_FILENAME, ActionStats
from refinevla_core.model.checkpoint_format import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    MANIFEST_NAME,
    CheckpointError,
    checkpoint_files,
    seal_checkpoint,
    write_extra_file,
)
from refinevla_core.model.pi0.configuration_pi0 import PI0_CONFIG_NAME, RefineVLAPi0Config


def is_pi0_checkpoint(directory: str | Path) -> bool:
    return (Path(directory) / PI0_CONFIG_NAME).is_file()


def save_pi0_checkpoint(  # noqa: PLR0917 (save_checkpoint's positional order)
        directory: str | Path, model: Any, processor: Any, stats: ActionStats | None,
                        config: RefineVLAPi0Config, extra_files: dict[str, Any] | None = None) -> Path:
    """Write a complete π0 checkpoint folder atomically (see the module docstring) and return its path."""
    directory = Path(directory)
    vlm = getattr(model, "vlm", model)
    if not isinstance(stats, ActionStats):
        raise CheckpointError("a π0 checkpoint needs the action statistics it was trained with (ActionStats)")
    if hasattr(vlm, "peft_config"):
        raise CheckpointError("the model still has peft adapters; merge them (merge_and_unload) before saving")
    if directory.exists() and not (directory / MANIFEST_NAME).is_file() and any(directory.iterdir()):
        raise CheckpointError(f"{directory} exists and is not a refinevla checkpoint; refusing to replace it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.saving-"))
    try:
        vlm.save_pretrained(str(tmp), safe_serialization=True)
        processor.save_pretrained(tmp)
        stats.save(tmp / STATS_FILENAME)
        (tmp / PI0_CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=1) + "\n")
        for name, content in (extra_files or {}).items():
            if name == PI0_CONFIG_NAME:
                raise CheckpointError(f"extra file name {name!r} would overwrite a checkpoint file")
            write_extra_file(tmp, name, content)
        seal_checkpoint(tmp, directory, {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                                         "family": "pi0", "files": checkpoint_files(tmp)})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
