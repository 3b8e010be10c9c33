"""The demo's training stage: one `refinevla train` process per model, `parallel` at a time with one torch thread
each, all on the same data for the same number of optimizer steps — only λ_r, the rationale dropout and the target
order differ. Each run resumes from its newest checkpoint when the demo is restarted (the trainer's resume=auto).

Progress: every child writes its tqdm bar to its log; the parent reads the newest "step/total" from each log and
shows one bar per model, so three runs in parallel stay readable.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from refinevla_core.config import save_config, to_dict
from refinevla_core.demo.cache import advance_bar
from refinevla_core.demo.config import ModelSettings, TrainSettings, resolve_repo_path
from refinevla_core.demo.data import child_env
from refinevla_core.demo.evaluate import checkpoint_fingerprint
from refinevla_core.training.config import load_train_config

POLL_S = 1.0
_STEP = re.compile(rb"(\d+)/(\d+) \[")


def train_config(settings: TrainSettings, model: ModelSettings, dataset: Path, output_dir: Path) -> Any:
    """The TrainConfig of one model: the base YAML, the shared demo settings, then the model's own keys."""
    overrides: dict[str, Any] = {
        **settings.extra,
        "dataset": str(dataset), "output_dir": str(output_dir),
        "max_steps": settings.max_steps, "epochs": None, "batch_size": settings.batch_size, "lr": settings.lr,
        "warmup_steps": settings.warmup_steps, "max_rationale_tokens": settings.max_rationale_tokens,
        "val_fraction": settings.val_fraction, "val_max_frames": settings.val_max_frames,
        "eval_every": settings.eval_every, "save_every": settings.save_every, "keep_checkpoints": 1,
        "lambda_rationale": model.lambda_rationale, "rationale_dropout": model.rationale_dropout,
        "target_order": model.target_order, "torch_threads": 1, "progress_bar": True, "resume": "auto",
        "device": "cpu", **model.extra,
    }
    return load_train_config(resolve_repo_path(settings.base_config), overrides)


def train_fingerprint_parts(settings: TrainSettings, model: ModelSettings) -> dict[str, Any]:
    base = resolve_repo_path(settings.base_config)
    shared = {k: v for k, v in to_dict(settings).items() if k not in ("models", "parallel")}
    from refinevla_core.training.trainer import refinevla_checkpoint_folder

    config = yaml.safe_load(base.read_text()) or {} if base.is_file() else {}
    weights = refinevla_checkpoint_folder(settings.extra.get("base_checkpoint", config.get("base_checkpoint")))
    return {"shared": shared, "model": {k: v for k, v in to_dict(model).items()  # an empty `extra` adds nothing
                                        if k not in ("description", "eval_rationale_mode") and v != {}},
            "base_config": base.read_text() if base.is_file() else str(base),
            "base_weights": checkpoint_fingerprint(weights) if weights else None}


@dataclass
class _Run:
    model: ModelSettings
    output_dir: Path
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    step: int = 0
    total: int = 0


def _latest_step(log_path: Path) -> tuple[int, int] | None:
    try:
        with log_path.open("rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - 4096))
            tail = fh.read()
    except OSError:
        return None
    found = _STEP.findall(tail)
    return (int(found[-1][0]), int(found[-1][1])) if found else None


def train_models(settings: TrainSettings, models: list[ModelSettings], dataset: Path, train_dir: Path,
                 progress: bool = True) -> dict[str, dict[str, Any]]:
    """Train `models` (those not cached) side by side; returns per model the final checkpoint and metrics paths."""
    from tqdm import tqdm

    runs = []
    for model in models:
        out = train_dir / model.name
        out.mkdir(parents=True, exist_ok=True)
        config = train_config(settings, model, dataset, out)
        save_config(config, out / "demo_train_config.yaml")
        runs.append(_Run(model, out, total=settings.max_steps))
    bars = {r.model.name: tqdm(total=r.total, desc=f"train {r.model.name}", unit="step", position=i,
                               disable=not progress, file=sys.stderr, dynamic_ncols=True, leave=True)
            for i, r in enumerate(runs)}
    pending = list(runs)
    active: list[_Run] = []
    try:
        while pending or active:
            while pending and len(active) < settings.parallel:
                active.append(_start(pending.pop(0)))
            time.sleep(POLL_S)
            for run in list(active):
                if _poll(run, bars[run.model.name]):
                    active.remove(run)
    finally:
        for run in active:
            if run.proc is not None and run.proc.poll() is None:
                run.proc.terminate()  # SIGTERM: its newest checkpoint stays; a rerun resumes from it
                run.proc.wait(60)
        for bar in bars.values():
            bar.close()
    results = {}
    for run in runs:
        final = run.output_dir / "final"
        if not (final / "refinevla_config.json").is_file():
            raise RuntimeError(f"training {run.model.name} ended without {final}; see {run.output_dir / 'train.log'}")
        results[run.model.name] = summarise_run(run.output_dir)
    return results


def _start(run: _Run) -> _Run:
    """Launch one `refinevla train` child writing to its own log."""
    run.log_path = run.output_dir / "train.log"
    with run.log_path.open("ab") as log:
        run.proc = subprocess.Popen(
            [sys.executable, "-m", "refinevla_core", "train", "--config",
             str(run.output_dir / "demo_train_config.yaml")],
            stdout=log, stderr=subprocess.STDOUT, env=child_env())
    return run


def _poll(run: _Run, bar: Any) -> bool:
    """Move the run's bar to the step its log shows; True once it has ended (RuntimeError with the log's tail if
    it failed)."""
    seen = _latest_step(run.log_path)
    if seen:
        run.step = seen[0]
        advance_bar(bar, min(run.step, bar.total))
    if run.proc.poll() is None:
        return False
    if run.proc.returncode != 0:
        tail = run.log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"training {run.model.name} failed (exit {run.proc.returncode}); "
                           f"log {run.log_path}:\n{tail}")
    advance_bar(bar, run.total)
    return True


def summarise_run(output_dir: Path) -> dict[str, Any]:
    """What the report needs from a finished run: checkpoint, metrics file, last losses, last validation."""
    metrics = json.loads((output_dir / "metrics.json").read_text())
    train = metrics.get("train") or []
    val = metrics.get("val") or []
    return {"checkpoint": str(output_dir / "final"), "metrics": str(output_dir / "metrics.json"),
            "loss_curve": str(output_dir / "loss_curve.png"), "steps": metrics.get("step"),
            "train_seconds": metrics.get("train_seconds"), "target_order": metrics.get("target_order"),
            "last_train": train[-1] if train else {}, "last_val": val[-1] if val else {},
            "data": metrics.get("data", {})}
