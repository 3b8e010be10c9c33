"""A run's folder on disk: its step checkpoints, where a run resumes, and the progress saved with each checkpoint.

    <output_dir>/checkpoints/step-00000200/model/          HF-style checkpoint (refinevla_core.model.checkpoint)
    <output_dir>/checkpoints/step-00000200/trainer_state/  accelerate state + progress.json + train_config.json
    <output_dir>/final/                                     the HF-style checkpoint of the last step

Why a module of its own: what makes a run resumable after kill -9 (temp folder renamed when complete, partial saves
removed at the next start, resume settings checked against the saved ones) is independent of the loop.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refinevla_core.config import ConfigError, to_dict
from refinevla_core.io import atomic_write_json, fsync_folder, swap_folder
from refinevla_core.training.config import RESUME_CRITICAL_KEYS, TrainConfig

CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step-(\d{8})$")
PROGRESS_NAME = "progress.json"
TRAINER_STATE = "trainer_state"


@dataclass
class Progress:
    """Where a run is: saved with every checkpoint, restored on resume."""

    step: int = 0  # optimizer steps done
    batches_consumed: int = 0  # global micro-batches taken from the sampler (all processes)
    train_history: list[dict[str, float]] = field(default_factory=list)
    val_history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "batches_consumed": self.batches_consumed, "train_history": self.train_history,
                "val_history": self.val_history, "train_seconds": self.train_seconds}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Progress:
        return cls(int(data["step"]), int(data["batches_consumed"]), list(data.get("train_history", [])),
                   list(data.get("val_history", [])), float(data.get("train_seconds", 0.0)))

    @classmethod
    def load(cls, checkpoint: Path) -> Progress:
        return cls.from_dict(json.loads((checkpoint / TRAINER_STATE / PROGRESS_NAME).read_text()))


def step_of(checkpoint: Path) -> int:
    return int(STEP_DIR.match(checkpoint.name).group(1))


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=step_of)


def clean_partial_checkpoints(output_dir: Path) -> list[Path]:
    """Remove the temp folders a killed save left behind; returns what was removed."""
    root = output_dir / CHECKPOINTS
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def resume_point(config: TrainConfig, output_dir: Path) -> Path | None:
    """The checkpoint to continue from (resume=auto: the newest; a path: that one), or None for a fresh run."""
    existing = list_checkpoints(output_dir)
    if config.resume == "never":
        if existing:
            raise ConfigError(
                f"{output_dir} already holds checkpoints ({existing[-1].name}); set resume=auto to continue that "
                "run, or choose a new output_dir"
            )
        return None
    if config.resume == "auto":
        return existing[-1] if existing else None
    path = Path(config.resume)
    if not (path / TRAINER_STATE / PROGRESS_NAME).is_file():
        raise ConfigError(f"resume={path}: not a training checkpoint (no {TRAINER_STATE}/{PROGRESS_NAME} in it)")
    return path


def check_resume_compatible(config: TrainConfig, checkpoint: Path) -> None:
    """The settings that shape the batch order and the model must match the saved run's."""
    saved_path = checkpoint / TRAINER_STATE / "train_config.json"
    saved = json.loads(saved_path.read_text())
    now = to_dict(config)
    diffs = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in RESUME_CRITICAL_KEYS if saved.get(k) != now.get(k)]
    if diffs:
        raise ConfigError(
            f"cannot resume {checkpoint}: the run was started with a different configuration ({'; '.join(diffs)}); "
            "use the original settings, or a new output_dir / resume=never"
        )


def start_checkpoint(output_dir: Path, step: int) -> tuple[Path, Path]:
    """(temp folder, final folder) of the checkpoint at `step`: written into the first, renamed to the second."""
    name = f"step-{step:08d}"
    root = output_dir / CHECKPOINTS
    return root / f".tmp-{name}", root / name


def finish_checkpoint(tmp: Path, final: Path, config: TrainConfig, progress: Progress, output_dir: Path) -> None:
    """Write the resume files, rename the complete folder into place and drop checkpoints beyond keep_checkpoints."""
    atomic_write_json(tmp / TRAINER_STATE / "train_config.json", to_dict(config))
    atomic_write_json(tmp / TRAINER_STATE / PROGRESS_NAME, progress.to_dict())
    if final.exists():
        shutil.rmtree(final)
    tmp.replace(final)
    fsync_folder(final.parent)
    for old in list_checkpoints(output_dir)[: -config.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)


def save_adapter(peft_model: Any, directory: Path) -> None:
    """The adapter alone (peft format) plus the new-token rows it needs; the merged folder beside it is the one
    Policy.from_checkpoint loads."""
    from safetensors.torch import save_file

    peft_model.save_pretrained(str(directory))
    rows = {n: p.detach().cpu().contiguous() for n, p in peft_model.named_parameters() if n.endswith(".rows")}
    if rows:
        save_file(rows, str(directory / "new_token_rows.safetensors"))


def replace_dir(source: Path, target: Path) -> None:
    """Copy a checkpoint folder to `target`, atomically replacing what is there."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:  # hard links: checkpoint files are never modified in place, so sharing them is safe and free
        shutil.copytree(source, tmp, copy_function=os.link)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
    swap_folder(tmp, target)
