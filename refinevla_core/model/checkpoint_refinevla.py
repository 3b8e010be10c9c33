"""Writing a ReFineVLA (PaliGemma family) checkpoint folder; checkpoint.py has the format, this module the files.

Kept below modeling_refinevla so that RefineVLA.save_pretrained can call it; loading is RefineVLA.from_pretrained.
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
    no_progress_bars,
    seal_checkpoint,
    write_extra_file,
)
from refinevla_core.model.configuration_refinevla import REFINEVLA_CONFIG_NAME, RefineVLAConfig
from refinevla_core.model.processor_refinevla import token_layout


def save_refinevla_checkpoint(  # noqa: PLR0917 (save_checkpoint's positional order)
        directory: str | Path, model: Any, processor: Any, stats: ActionStats, refinevla_config: RefineVLAConfig,
        extra_files: dict[str, Any] | None = None) -> Path:
    """Write a complete RefineVLA checkpoint folder atomically (see checkpoint.save_checkpoint) and return its path."""
    directory = Path(directory)
    vlm = getattr(model, "vlm", model)
    if not isinstance(stats, ActionStats):
        raise CheckpointError(
            "save_checkpoint needs the action statistics (ActionStats) the model was trained with: compute them with "
            "refinevla_core.data.stats.compute_dataset_stats(<dataset>)"
        )
    if hasattr(vlm, "peft_config"):
        raise CheckpointError("the model still has peft adapters; call model.merge_and_unload() before saving")
    if directory.exists() and not (directory / MANIFEST_NAME).is_file() and any(directory.iterdir()):
        raise CheckpointError(
            f"{directory} exists and is not a refinevla checkpoint; refusing to replace it — choose another folder"
        )
    layout = token_layout(processor.tokenizer, processor.layout.num_image_tokens, refinevla_config.n_action_bins)
    config = RefineVLAConfig.from_dict({**refinevla_config.to_dict(), "tokens": None})
    config.tokens = layout
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.saving-"))
    try:
        with no_progress_bars():
            vlm.save_pretrained(str(tmp), safe_serialization=True)
        processor.save_pretrained(tmp)
        stats.save(tmp / STATS_FILENAME)
        (tmp / REFINEVLA_CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=1) + "\n")
        for name, content in (extra_files or {}).items():
            write_extra_file(tmp, name, content)
        files = checkpoint_files(tmp)
        if not any(name.endswith(".safetensors") for name in files):
            raise CheckpointError("the model wrote no .safetensors file; refusing a pickle-only checkpoint")
        seal_checkpoint(tmp, directory, {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "files": files})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
