"""Training curves in TensorBoard, Weights & Biases or trackio through accelerate's trackers; off by default.

metrics.json and loss_curve.png stay the record of every run; a tracker is the live view people already use for
everything else they train. `report_to` (TrainConfig) names one or several, comma-separated:

    refinevla train --config train_tiny dataset=data/pushcube report_to=tensorboard
    tensorboard --logdir runs/train_tiny/tracking        # or any TensorBoard; the event files are plain files

What is logged, at the run's log_every / eval_every steps: train/loss, train/loss_action, train/loss_rationale,
train/lr, and every scalar validation metric as val/<name>; the run's config as hyperparameters. Light at import
time (no torch, no tracker package): the config check imports it.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

from refinevla_core.config import ConfigError, to_dict

TRACKERS = ("tensorboard", "wandb", "trackio")
TRACKING_DIR = "tracking"  # <output_dir>/tracking/<run name>/ holds TensorBoard event files (and wandb's offline runs)
# what each tracker needs installed, and how to get it (tensorboardX is accelerate's light TensorBoard writer)
PACKAGES = {
    "tensorboard": (("tensorboard", "tensorboardX"), "pip install tensorboardX (or tensorboard)"),
    "wandb": (("wandb",), "pip install wandb, then `wandb login` (or WANDB_MODE=offline)"),
    "trackio": (("trackio",), "pip install trackio"),
}


def tracker_names(report_to: str) -> list[str]:
    """'none' / '' -> []; 'tensorboard,wandb' -> ['tensorboard', 'wandb']; anything else is a ConfigError."""
    names = [n.strip() for n in str(report_to).split(",") if n.strip() and n.strip() != "none"]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ConfigError(f"report_to: {unknown[0]!r} is not a tracker; choose none or any of {', '.join(TRACKERS)} "
                          "(comma-separated)")
    return list(dict.fromkeys(names))


def check_installed(names: list[str]) -> None:
    """Fail before training starts, naming the install command, instead of accelerate dropping the tracker."""
    for name in names:
        modules, fix = PACKAGES[name]
        if not any(importlib.util.find_spec(m) is not None for m in modules):
            raise ConfigError(f"report_to={name} needs {' or '.join(modules)}: {fix}")


def accelerator_kwargs(report_to: str, output_dir: Path) -> dict[str, Any]:
    """Keyword arguments for accelerate.Accelerator: none when tracking is off."""
    names = tracker_names(report_to)
    if not names:
        return {}
    check_installed(names)
    return {"log_with": names, "project_dir": str(Path(output_dir) / TRACKING_DIR)}


def hyperparameters(config: Any) -> dict[str, bool | int | float | str]:
    """The config flattened to dotted scalar keys (what TensorBoard's hparams and the other trackers accept)."""
    flat: dict[str, bool | int | float | str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        elif isinstance(value, (bool, int, float, str)):
            flat[prefix] = value
        else:  # None, lists: as text
            flat[prefix] = str(value)

    walk("", to_dict(config))
    return flat


def _scalars(prefix: str, values: dict[str, Any], skip: tuple[str, ...] = ("step",)) -> dict[str, float]:
    out = {}
    for key, value in values.items():
        if key in skip or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):  # a step whose samples all had their rationale dropped has no rationale loss
            out[f"{prefix}/{key}"] = float(value)
    return out


class RunTracker:
    """The trackers of one run (a no-op when report_to is none). Only the main process writes (accelerate's rule)."""

    def __init__(self, accelerator: Any, config: Any, output_dir: Path) -> None:
        self.accelerator = accelerator
        self.names = tracker_names(getattr(config, "report_to", "none"))
        if self.names:
            run_name = Path(output_dir).resolve().name
            init = {"wandb": {"name": run_name, "dir": str(Path(output_dir) / TRACKING_DIR)}}
            accelerator.init_trackers(run_name, config=hyperparameters(config),
                                      init_kwargs={k: v for k, v in init.items() if k in self.names})

    def log_train(self, entry: dict[str, Any]) -> None:
        """One train_history entry: step, lr and the mean loss terms since the last one."""
        if self.names:
            self.accelerator.log(_scalars("train", entry), step=int(entry["step"]))

    def log_validation(self, metrics: dict[str, Any], step: int) -> None:
        """The scalar validation metrics (per-dimension lists stay in metrics.json)."""
        if self.names:
            self.accelerator.log(_scalars("val", metrics), step=int(step))

    def end(self) -> None:
        if self.names:
            self.accelerator.end_training()
