"""Atomic file writes and folder swaps: the one place every writer (datasets, conversions, checkpoints, benchmarks)
gets "a reader sees the old version or the new one, never half" from.

A file is written to a temp file in the same folder, flushed and fsynced, then renamed over the target (os.replace is
atomic within a file system). A folder is built under a temp name next to its target and renamed into place when
complete; an existing target is first renamed aside, then removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder, fsync, rename: readers never see a partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; a written file is as readable as any other
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any, indent: int = 1) -> None:
    """`obj` as JSON (numpy arrays and scalars become lists and numbers) plus a final newline, written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, default=json_default) + "\n")


def json_default(o: Any) -> Any:
    """json.dumps(default=...) for numpy values."""
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def fsync_folder(path: Path) -> None:
    """Make the renames inside `path` durable (best effort: some file systems cannot open a folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def swap_folder(tmp: Path, target: Path, aside: str = "old") -> None:
    """Put the complete folder `tmp` at `target` by renames, so a reader sees the old or the new one, never half.

    An existing `target` is renamed to `.<name>.<aside>-<pid>` first and removed after the swap."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.{aside}-{os.getpid()}")
        target.replace(old)
    tmp.replace(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def folder_built_in_place_of(target: Path, tmp: Path, aside: str = "old") -> Iterator[Path]:
    """Yield the path `tmp` to build a folder at (a leftover there is removed first; the block creates it); when the
    block succeeds the folder replaces `target` (swap_folder), when it raises, `tmp` is removed and `target` is left
    as it was."""
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        swap_folder(tmp, target, aside)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
