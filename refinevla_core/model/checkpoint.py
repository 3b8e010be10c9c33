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

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch

from refinevla_core.data.episode import DataError
from refinevla_core.data.stats import STATS_FILENAME, ActionStats
from refinevla_core.io import swap_folder
from refinevla_core.model.configuration_refinevla import REFINEVLA_CONFIG_NAME, RefineVLAConfig

MANIFEST_NAME = "refinevla_checkpoint.json"
CHECKPOINT_FORMAT = "refinevla-checkpoint"
CHECKPOINT_VERSION = 1
HASH_LIMIT_BYTES = 256 * 2**20  # verify="auto": sha256 for files up to 256 MiB, size only above
Verify = Literal["auto", "size", "sha256"]


class CheckpointError(ValueError):
    """A checkpoint folder cannot be saved or loaded; the message names the file and the fix."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_extra(directory: Path, name: str, content: Any) -> None:
    target = directory / name
    if target.resolve().parent != directory.resolve() and directory.resolve() not in target.resolve().parents:
        raise CheckpointError(f"extra file name {name!r} leaves the checkpoint folder")
    if name in (MANIFEST_NAME, STATS_FILENAME, REFINEVLA_CONFIG_NAME, "config.json"):
        raise CheckpointError(f"extra file name {name!r} would overwrite a checkpoint file")
    target.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, os.PathLike):  # a file to copy; a plain str is text to write
        shutil.copyfile(content, target)
    elif isinstance(content, bytes):
        target.write_bytes(content)
    elif isinstance(content, str):
        target.write_text(content)
    else:
        target.write_text(json.dumps(content, indent=1, default=str) + "\n")


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers draws a "Writing model shards" bar for every save, into the middle of training logs."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


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
    directory = Path(directory)
    if getattr(refinevla_config, "family", None) == "pi0":
        from refinevla_core.model.pi0.checkpoint_pi0 import save_pi0_checkpoint

        return save_pi0_checkpoint(directory, model, processor, stats, refinevla_config, extra_files)
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
    from refinevla_core.model.processor_refinevla import token_layout

    layout = token_layout(processor.tokenizer, processor.layout.num_image_tokens, refinevla_config.n_action_bins)
    config = RefineVLAConfig.from_dict({**refinevla_config.to_dict(), "tokens": None})
    config.tokens = layout
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.saving-"))
    try:
        with _no_progress_bars():
            vlm.save_pretrained(str(tmp), safe_serialization=True)
        processor.save_pretrained(tmp)
        stats.save(tmp / STATS_FILENAME)
        (tmp / REFINEVLA_CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=1) + "\n")
        for name, content in (extra_files or {}).items():
            _write_extra(tmp, name, content)
        files = checkpoint_files(tmp)
        if not any(name.endswith(".safetensors") for name in files):
            raise CheckpointError("the model wrote no .safetensors file; refusing a pickle-only checkpoint")
        seal_checkpoint(tmp, directory, {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "files": files})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


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


def checkpoint_files(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file of a folder being saved: relative name -> size and sha256 (the manifest's `files`)."""
    return {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(folder.rglob("*")) if p.is_file()}


def seal_checkpoint(tmp: Path, directory: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest last, fsync every file, then swap `tmp` in as `directory` (both model families)."""
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
    for p in tmp.rglob("*"):
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())
    swap_folder(tmp, directory)


def verify_checkpoint(directory: str | Path, verify: Verify = "auto") -> dict[str, Any]:
    """Check the manifest against the files (existence, size, sha256); returns the manifest."""
    directory = Path(directory)
    if not directory.is_dir():
        hint = (" (load_checkpoint reads local folders; to start from a hub model use the preset "
                "paligemma2-3b-224 with base.pretrained=<hub id>)") if "/" in str(directory) else ""
        raise CheckpointError(f"checkpoint folder {directory} does not exist{hint}")
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        raise CheckpointError(
            f"{directory} is not a complete refinevla checkpoint: {MANIFEST_NAME} is missing (the save was "
            "interrupted, or the folder was not written by save_checkpoint); re-save it with save_checkpoint"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest_path} is damaged ({e!r}); re-save the checkpoint") from e
    if manifest.get("format") != CHECKPOINT_FORMAT or int(manifest.get("version", 0)) > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{manifest_path}: format {manifest.get('format')!r} version {manifest.get('version')} is not readable by "
            f"this refinevla ({CHECKPOINT_FORMAT} <= {CHECKPOINT_VERSION}); upgrade refinevla"
        )
    for name, info in files.items():
        path = directory / name
        if not path.is_file():
            what = "action statistics" if name == STATS_FILENAME else "file"
            raise CheckpointError(
                f"checkpoint {directory} is missing its {what} {name}; the statistics, tokenizer and weights must "
                "travel together — copy the whole folder again"
            )
        size = path.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(
                f"{path} has {size} bytes but the checkpoint was saved with {info['bytes']}: the file is "
                f"{'truncated' if size < info['bytes'] else 'altered'} (an interrupted copy?); copy it again"
            )
        hash_it = verify == "sha256" or (verify == "auto" and size <= HASH_LIMIT_BYTES)
        if hash_it and _sha256(path) != info["sha256"]:
            raise CheckpointError(
                f"{path} is corrupt: its sha256 differs from the one saved in {MANIFEST_NAME}; copy it again"
            )
    return manifest


def load_checkpoint(
    directory: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | None = None,
    verify: Verify = "auto",
    attn_implementation: str | None = None,
) -> Any:
    """Load a RefineVLA (model, processor, config, statistics) from a folder written by save_checkpoint."""
    from transformers import PaliGemmaForConditionalGeneration

    from refinevla_core.model.modeling_refinevla import DTYPES, ModelError, RefineVLA
    from refinevla_core.model.processor_refinevla import ProcessorError, RefineVLAProcessor

    directory = Path(directory)
    from refinevla_core.model.pi0.checkpoint_pi0 import is_pi0_checkpoint, load_pi0_checkpoint

    if is_pi0_checkpoint(directory):
        return load_pi0_checkpoint(directory, device=device, dtype=dtype, verify=verify)
    verify_checkpoint(directory, verify)
    try:
        config = RefineVLAConfig.from_dict(json.loads((directory / REFINEVLA_CONFIG_NAME).read_text()),
                                           where=str(directory / REFINEVLA_CONFIG_NAME))
    except (OSError, json.JSONDecodeError, ValueError) as e:
        raise CheckpointError(f"{directory / REFINEVLA_CONFIG_NAME} is unreadable ({e})") from e
    try:
        stats = ActionStats.load(directory / STATS_FILENAME)
    except DataError as e:
        raise CheckpointError(f"checkpoint {directory}: {e}") from e
    hf_config = json.loads((directory / "config.json").read_text())
    if hf_config.get("model_type") != "paligemma":
        raise CheckpointError(
            f"{directory} holds a {hf_config.get('model_type')!r} model, not a ReFineVLA (PaliGemma) checkpoint; "
            "SpatialVLA/OpenVLA checkpoints load through refinevla_core.model.adapters with trust_remote_code=True"
        )
    try:
        processor = RefineVLAProcessor.from_pretrained(directory, config, stats)
    except (OSError, ValueError, ProcessorError) as e:
        raise CheckpointError(f"the tokenizer/processor files of {directory} are unusable ({e})") from e
    torch_dtype = DTYPES[dtype or config.dtype]
    try:
        vlm, info = PaliGemmaForConditionalGeneration.from_pretrained(
            str(directory), use_safetensors=True, dtype=torch_dtype, local_files_only=True,
            attn_implementation=attn_implementation or config.attn_implementation, output_loading_info=True,
        )
    except Exception as e:  # safetensors/torch raise many types for damaged or mismatched weights
        raise CheckpointError(
            f"the weights in {directory} cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
            "they are damaged or not safetensors — copy the checkpoint again or re-save it with save_checkpoint"
        ) from e
    missing = [k for k in info.get("missing_keys", []) if not k.startswith("lm_head")]
    if missing or info.get("mismatched_keys"):
        raise CheckpointError(
            f"the weights in {directory} do not fit config.json: missing {missing[:5]}, mismatched "
            f"{list(info.get('mismatched_keys', []))[:5]}; the weights and config come from different models"
        )
    vlm.eval().to(device)
    try:
        return RefineVLA(vlm, processor, config, stats)
    except ModelError as e:
        raise CheckpointError(f"checkpoint {directory}: {e}") from e
