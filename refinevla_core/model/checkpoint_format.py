"""The checkpoint folder format both model families share: a manifest of every file's size and sha256, written
last, so a folder is either complete and verifiable or visibly not a checkpoint.

    <dir>/refinevla_checkpoint.json   manifest: {"format", "version", ["family",] "files": {name: {bytes, sha256}}}

Why a module of its own: the RefineVLA writer (checkpoint.py), the π0 writer (pi0/checkpoint_pi0.py) and both loaders
(the model classes' from_pretrained) use it, and it needs none of them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from refinevla_core.data.stats import STATS_FILENAME
from refinevla_core.io import swap_folder
from refinevla_core.model.configuration_refinevla import REFINEVLA_CONFIG_NAME

MANIFEST_NAME = "refinevla_checkpoint.json"
CHECKPOINT_FORMAT = "refinevla-checkpoint"
CHECKPOINT_VERSION = 1
HASH_LIMIT_BYTES = 256 * 2**20  # verify="auto": sha256 for files up to 256 MiB, size only above
Verify = Literal["auto", "size", "sha256"]


class CheckpointError(ValueError):
    """A checkpoint folder cannot be saved or loaded; the message names the file and the fix."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_extra_file(directory: Path, name: str, content: Any) -> None:
    """Write one extra file into a checkpoint being saved: str text, bytes, a path to copy, or JSON."""
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
def no_progress_bars() -> Iterator[None]:
    """transformers draws a "Writing model shards" bar for every save, into the middle of training logs."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def checkpoint_files(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file of a folder being saved: relative name -> size and sha256 (the manifest's `files`)."""
    return {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
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
        if hash_it and file_sha256(path) != info["sha256"]:
            raise CheckpointError(
                f"{path} is corrupt: its sha256 differs from the one saved in {MANIFEST_NAME}; copy it again"
            )
    return manifest
