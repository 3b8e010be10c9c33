"""The training loop: selective transfer + joint loss on accelerate, resumable after kill -9, with validation,
a progress bar showing both loss terms, a metrics JSON and a loss-curve PNG per run.

Why accelerate: `python -m refinevla_core train ...` runs on one device, and the very same entry point under
`accelerate launch --multi_gpu ...` (DDP) or an FSDP accelerate config runs on many; its save_state/load_state
restore model, optimizer, scheduler and every RNG (python, numpy, torch, CUDA) per process.

Output folder:

    <output_dir>/checkpoints/step-00000200/model/          HF-style checkpoint (refinevla_core.model.checkpoint):
                                                            weights, config, processor, stats, training config
    <output_dir>/checkpoints/step-00000200/trainer_state/  accelerate state + progress.json (step, batches consumed,
                                                            loss history): what resuming needs
    <output_dir>/final/                                     the HF-style checkpoint of the last step
    <output_dir>/metrics.json, loss_curve.png, train_config.yaml

A checkpoint is written into `checkpoints/.tmp-step-...` and renamed when complete, so a run killed mid-save leaves
the previous checkpoint as the newest one (the leftover temp folder is removed at the next start). Resuming rebuilds
the model from the config, restores the state and continues with the batch after the last one consumed: the batch
order is a pure function of (seed, batch number) (data.ResumableBatchSampler), so the resumed run computes what an
uninterrupted run would.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refinevla_core.config import ConfigError, save_config, to_dict
from refinevla_core.data.episode import DataError
from refinevla_core.data.episode_dataset import EpisodeDataset, atomic_write_json
from refinevla_core.training.config import RESUME_CRITICAL_KEYS, TrainConfig
from refinevla_core.training.data import (
    EpisodeFrames,
    ResumableBatchSampler,
    TrainingSample,
    split_episodes,
    training_split_stats,
    validation_indices,
)
from refinevla_core.training.freezing import (
    FreezeReport,
    apply_lora,
    apply_selective_transfer,
    describe,
    export_for_saving,
)
from refinevla_core.training.loss import joint_loss

CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step-(\d{8})$")
PROGRESS_NAME = "progress.json"
METRICS_NAME = "metrics.json"
CURVE_NAME = "loss_curve.png"
REPO_ROOT = Path(__file__).resolve().parents[2]
TRUNCATION_WARN_SHARE = 0.1  # above this share of shortened rationales the trainer warns


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


@dataclass
class TrainResult:
    output_dir: Path
    final_checkpoint: Path
    metrics: dict[str, Any]
    resumed_from: Path | None = None
    main_process: bool = True  # False on the other ranks of a multi-process (accelerate launch) run


# ---- the model side (refinevla_core.model) ---------------------------------------------------------------------------
def build_model(config: TrainConfig) -> Any:
    """The RefineVLA to fine-tune: a preset (random init or its pretrained base), or a previous run's checkpoint."""
    from refinevla_core.model.presets import build_from_preset

    overrides = {}
    if config.max_rationale_tokens is not None:
        overrides["max_rationale_tokens"] = config.max_rationale_tokens
    base = config.base_checkpoint
    local = refinevla_checkpoint_folder(base)
    if local is not None:
        return _from_refinevla_checkpoint(local, config, overrides)
    return build_from_preset(config.preset, target_order=config.target_order, base_checkpoint=base,
                             seed=config.seed, overrides=overrides or None)


def refinevla_checkpoint_folder(base: str | None) -> Path | None:
    """A base_checkpoint that is a checkpoint of this project: relative to the working directory or, for the
    shipped models/ (e.g. models/tiny-base), to the repository; None for a preset's pretrained base or hub id."""
    if not base:
        return None
    for folder in (Path(base), REPO_ROOT / base):
        if (folder / "refinevla_config.json").is_file():
            return folder
    return None


def _from_refinevla_checkpoint(path: Path, config: TrainConfig, overrides: dict[str, Any]) -> Any:
    """Stage 2 from stage 1: continue from a checkpoint written by this trainer (or save_checkpoint)."""
    from refinevla_core.model.checkpoint import load_checkpoint
    from refinevla_core.model.configuration_refinevla import RefineVLAConfig
    from refinevla_core.model.modeling_refinevla import RefineVLA

    loaded = load_checkpoint(path)
    changes = dict(overrides)
    if config.target_order is not None:
        changes["target_order"] = config.target_order
    if not changes:
        return loaded
    new_config = RefineVLAConfig.from_dict({**loaded.refinevla_config.to_dict(), **changes})
    loaded.processor.config = new_config
    return RefineVLA(loaded.vlm, loaded.processor, new_config)


def _check_model_source(config: TrainConfig) -> None:
    """Unknown preset or missing base checkpoint folder -> ConfigError naming the choices, before any work."""
    from refinevla_core.model.presets import load_preset

    base = config.base_checkpoint
    if refinevla_checkpoint_folder(base) is not None:
        return
    load_preset(config.preset)  # ConfigError: unknown model preset ..., choose one of [...]


def _check_distributed_type(accelerator: Any) -> None:
    """DeepSpeed and Megatron are refused with the alternatives named: the checkpoint export (new-token rows folded
    into the head, LoRA merged) works on whole parameters; one device, DDP and FSDP (training/fsdp.py gathers the
    full weights for the export) are supported."""
    kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type)).upper()
    if kind in ("DEEPSPEED", "MEGATRON_LM"):
        raise ConfigError(
            f"refinevla train runs on one device, with DDP or with FSDP; {kind} is not supported (its sharded "
            "parameters are not exported by this trainer). Launch with `accelerate launch --multi_gpu` (DDP) or "
            "`accelerate launch --config_file config/accelerate_fsdp.yaml` (FSDP, full fine-tuning) instead"
        )


def new_token_ids(model: Any) -> list[int]:
    """The ReFineVLA tokens added to the vocabulary: <act_000..>, <begin_action>, <begin_rationale>."""
    lay = model.processor.layout
    return [*range(lay.action_token_start, lay.action_token_end), lay.begin_action_id, lay.begin_rationale_id]


class Collator:
    """Samples -> the processor's teacher-forcing batch (+ continuous actions for validation L1)."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, samples: list[TrainingSample]) -> dict[str, torch.Tensor]:
        actions = np.stack([s.action for s in samples]).astype(np.float32)
        batch = self.processor.training_batch(
            [s.image for s in samples], [s.instruction for s in samples], actions, [s.rationale for s in samples]
        )
        batch["actions"] = torch.from_numpy(actions)
        return batch


# ---- checkpoints on disk ---------------------------------------------------------------------------------------------
def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def _clean_partial_checkpoints(output_dir: Path) -> list[Path]:
    root = output_dir / CHECKPOINTS
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def _resume_point(config: TrainConfig, output_dir: Path) -> Path | None:
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
    if not (path / "trainer_state" / PROGRESS_NAME).is_file():
        raise ConfigError(f"resume={path}: not a training checkpoint (no trainer_state/{PROGRESS_NAME} in it)")
    return path


def _check_resume_compatible(config: TrainConfig, checkpoint: Path) -> None:
    saved_path = checkpoint / "trainer_state" / "train_config.json"
    saved = json.loads(saved_path.read_text())
    now = to_dict(config)
    diffs = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in RESUME_CRITICAL_KEYS if saved.get(k) != now.get(k)]
    if diffs:
        raise ConfigError(
            f"cannot resume {checkpoint}: the run was started with a different configuration ({'; '.join(diffs)}); "
            "use the original settings, or a new output_dir / resume=never"
        )


# ---- the run ---------------------------------------------------------------------------------------------------------
class Trainer:
    """One training run for a TrainConfig. `run()` trains (or resumes) to the end and returns a TrainResult."""

    def __init__(self, config: TrainConfig, log: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.output_dir = Path(config.output_dir)
        self._log = log

    def log(self, message: str) -> None:
        acc = getattr(self, "accelerator", None)
        if acc is None or acc.is_main_process:
            (self._log or _print_above_progress_bar)(message)

    # ---- setup ----------------------------------------------------------------------------------------------------
    def _accelerator(self) -> Any:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        if not torch.distributed.is_available() or not torch.distributed.is_initialized():
            # a second run in the same process (tests, the benchmark) may change precision / device
            AcceleratorState._reset_state(reset_partial_state=True)
        # cpu=True also on a machine without CUDA: that is what makes accelerate run several CPU processes (torchrun)
        # as one DDP job over gloo instead of as independent single-process runs
        cpu = self.config.device == "cpu" or not torch.cuda.is_available()
        from refinevla_core.training.fsdp import prepare_fsdp
        from refinevla_core.training.tracking import accelerator_kwargs  # report_to: TensorBoard / W&B / trackio

        acc = Accelerator(mixed_precision="bf16" if self.config.precision == "bf16" else "no", cpu=cpu,
                          **accelerator_kwargs(self.config.report_to, self.output_dir))
        return prepare_fsdp(acc, self.config)  # FSDP also for CPU processes when requested; no LoRA under FSDP

    def _open_data(self) -> EpisodeDataset:
        from refinevla_core.data.stats import load_dataset_stats

        if not self.config.dataset:
            raise ConfigError("dataset is not set; give dataset=<folder written by refinevla collect/convert>")
        dataset = EpisodeDataset(self.config.dataset)
        load_dataset_stats(dataset)  # DataError naming compute_dataset_stats when missing or stale: fail early
        return dataset

    def _setup(self) -> None:
        cfg = self.config
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        # every check that can fail comes before anything is written: a bad config leaves no half-made run behind
        dataset = self._open_data()  # before the model: a missing dataset fails in a second
        _check_model_source(cfg)
        self.resume_from = _resume_point(cfg, self.output_dir)
        if self.resume_from is not None:
            _check_resume_compatible(cfg, self.resume_from)
        self.accelerator = acc = self._accelerator()
        _check_distributed_type(acc)
        from accelerate.utils import set_seed

        set_seed(cfg.seed)
        model = build_model(cfg)
        self.refinevla = model
        family_report = model.prepare_training(cfg) if hasattr(model, "prepare_training") else None  # π0 family
        report = family_report or apply_selective_transfer(model.vlm, cfg.freeze, new_token_ids(model))
        if cfg.lora.enabled and family_report is None:
            model.vlm = apply_lora(model.vlm, report, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                                   module_names=cfg.lora.target_modules)
            rows = describe(model.vlm)
            rows.frozen_layers, rows.num_layers = report.frozen_layers, report.num_layers
            rows.new_token_rows, rows.num_new_tokens = report.new_token_rows, report.num_new_tokens
            report = rows
        self.report: FreezeReport = report
        if cfg.gradient_checkpointing:
            base = model.vlm.get_base_model() if hasattr(model.vlm, "get_base_model") else model.vlm
            # non-reentrant: frozen lower layers give inputs without requires_grad, which reentrant checkpoints drop
            kwargs = {"use_reentrant": False}
            if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x name
                base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        source = f"from {cfg.base_checkpoint}" if cfg.base_checkpoint else "random init"
        self.log(f"refinevla train: {model.refinevla_config.name} model ({source}), "
                 f"target order {model.refinevla_config.target_order}, "
                 f"λ_r = {cfg.lambda_rationale}, rationale dropout {cfg.rationale_dropout:.0%}, "
                 f"{'LoRA r=' + str(cfg.lora.r) if cfg.lora.enabled else 'no LoRA'}, {cfg.precision}, "
                 f"{acc.num_processes} process(es) on {acc.device}")
        self.log(report.table())
        from refinevla_core.training.precision import apply_training_precision

        self.log(apply_training_precision(model.vlm, cfg.precision).describe())  # fp32 master weights

        train_eps, val_eps = split_episodes(len(dataset), cfg.val_fraction, cfg.seed)
        self.stats = training_split_stats(dataset, train_eps)  # held-out actions never shape the bins
        model.processor.set_action_stats(self.stats)
        # λ_r = 0 is plain action fine-tuning in every target order: no rationale is ever fed as input either
        dropout = 1.0 if cfg.lambda_rationale == 0 else cfg.rationale_dropout
        if dropout != cfg.rationale_dropout:
            self.log(f"λ_r = 0: plain action fine-tuning, rationales are never fed (rationale_dropout "
                     f"{cfg.rationale_dropout:.0%} -> 100%)")
        frames = getattr(model, "training_frames", EpisodeFrames)  # π0: samples carry action chunks
        self.train_frames = frames(dataset, train_eps, seed=cfg.seed, rationale_dropout=dropout)
        self.val_frames = frames(dataset, val_eps, seed=cfg.seed)
        self.val_keys = validation_indices(len(self.val_frames), cfg.val_max_frames) if len(self.val_frames) else []
        if self.train_frames.num_with_rationale == 0 and cfg.lambda_rationale > 0:
            self.log(f"warning: no training frame has a rationale (run `refinevla annotate` on {cfg.dataset}); "
                     "only the action term trains")
        self.truncated_share = self._report_truncation(dataset) if self.train_frames.num_with_rationale and \
            cfg.lambda_rationale > 0 else None
        per_epoch = len(self.train_frames) // cfg.batch_size
        if per_epoch == 0:
            raise DataError(
                f"the training split has {len(self.train_frames)} frames, fewer than batch_size={cfg.batch_size}; "
                "lower batch_size or add episodes"
            )
        per_step = cfg.grad_accumulation * acc.num_processes
        if cfg.max_steps is not None:
            self.total_steps = cfg.max_steps
        else:
            self.total_steps = max(1, math.ceil(cfg.epochs * per_epoch / per_step))
        self.batches_per_step = per_step
        self.log(f"data: {len(train_eps)} train episodes ({len(self.train_frames)} frames, "
                 f"{self.train_frames.num_with_rationale} with a rationale), {len(val_eps)} validation episodes "
                 f"({len(self.val_frames)} frames, {len(self.val_keys)} evaluated); {self.total_steps} steps of "
                 f"{cfg.batch_size} x {cfg.grad_accumulation} x {acc.num_processes} "
                 f"= {self.total_steps * cfg.batch_size * per_step / len(self.train_frames):.2f} epochs")

        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            for p in _clean_partial_checkpoints(self.output_dir):
                self.log(f"removed the partial checkpoint {p} left by an interrupted save")

        params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        optimizer = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[cfg.optimizer](
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
        )
        from transformers import get_scheduler

        from refinevla_core.model.checkpoint import save_tied_weights_quietly

        schedule = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.schedule]
        self.scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=cfg.warmup_for(self.total_steps),
                                       num_training_steps=self.total_steps)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        acc.register_for_checkpointing(self.scheduler)  # stepped once per optimizer step, on every process
        save_tied_weights_quietly(acc)  # no "Removed shared tensor" alarm at every save
        self.collate = getattr(model, "collator", Collator)(model.processor)
        self.progress = Progress()
        if self.resume_from is not None:
            acc.load_state(str(self.resume_from / "trainer_state"))
            self.progress = Progress.from_dict(
                json.loads((self.resume_from / "trainer_state" / PROGRESS_NAME).read_text())
            )
            self.log(f"resumed from {self.resume_from} at step {self.progress.step}")

    def _report_truncation(self, dataset: EpisodeDataset, sample: int = 2000) -> float:
        """Share of training rationales longer than max_rationale_tokens (their sections get shortened): printed
        always, a warning above TRUNCATION_WARN_SHARE - a model cannot learn the part of a rationale it never sees."""
        processor = self.refinevla.processor
        rationales = dataset.rationales()
        keys = [ref for ref in self.train_frames.refs if ref in rationales]
        keys = [keys[i] for i in np.linspace(0, len(keys) - 1, min(sample, len(keys))).round().astype(int)]
        share = sum(not processor.rationale_fits(rationales[k]) for k in keys) / len(keys)
        budget = processor.config.max_rationale_tokens
        self.log(f"rationales: {share:.1%} of the training rationales exceed {budget} tokens (sections shortened)")
        if share > TRUNCATION_WARN_SHARE:
            self.log(f"warning: {share:.0%} of the rationales are shortened to {budget} tokens; raise "
                     "max_rationale_tokens or make the teacher's rationales shorter")
        return share

    # ---- one step ---------------------------------------------------------------------------------------------
    def _loss(self, batch: dict[str, torch.Tensor], lambda_rationale: float) -> Any:
        device = self.accelerator.device
        batch = {k: v.to(device) for k, v in batch.items()}
        if getattr(self.refinevla, "family", None) == "pi0":  # computes its own joint loss (flow + λ_r · CE)
            return self.model(**batch, lambda_rationale=lambda_rationale).joint_loss, None, batch
        out = self.model(**batch)
        return joint_loss(out.logits, batch["labels"], batch["action_mask"], batch["rationale_mask"],
                          lambda_rationale, format_mask=batch.get("format_mask")), out.logits, batch

    def _batches(self) -> Any:
        from torch.utils.data import DataLoader

        cfg = self.config
        acc = self.accelerator
        sampler = ResumableBatchSampler(
            len(self.train_frames), cfg.batch_size, cfg.seed,
            total_batches=self.total_steps * self.batches_per_step, start_batch=self.progress.batches_consumed,
            num_shards=acc.num_processes, shard=acc.process_index,
        )
        loader = DataLoader(self.train_frames, batch_sampler=sampler, collate_fn=self.collate,
                            num_workers=cfg.num_workers)
        return iter(loader)

    def _train_step(self, batches: Any) -> dict[str, float]:
        cfg = self.config
        acc = self.accelerator
        sums = torch.zeros(4, dtype=torch.float64)  # action/rationale loss sums (token-weighted), token counts
        self.model.train()
        for k in range(cfg.grad_accumulation):
            batch = next(batches)
            sync = k == cfg.grad_accumulation - 1
            with nullcontext() if sync else acc.no_sync(self.model):
                loss, _, _ = self._loss(batch, cfg.lambda_rationale)
                acc.backward(loss.total / cfg.grad_accumulation)
            n_act = loss.action_tokens + loss.format_tokens
            sums += torch.tensor([float(loss.action.detach()) * n_act,
                                  float(loss.rationale.detach()) * loss.rationale_tokens,
                                  n_act, loss.rationale_tokens], dtype=torch.float64)
        if cfg.max_grad_norm > 0:
            acc.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.batches_consumed += self.batches_per_step
        self.progress.step += 1
        sums = acc.reduce(sums.to(acc.device), reduction="sum").cpu() if acc.num_processes > 1 else sums
        act = float(sums[0] / max(sums[2], 1))
        rat = float(sums[1] / sums[3]) if sums[3] > 0 else float("nan")
        total = act + cfg.lambda_rationale * (0.0 if math.isnan(rat) else rat)
        return {"loss": total, "loss_action": act, "loss_rationale": rat}

    # ---- validation -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Held-out metrics. `action_l1` / `action_l1_xyz`: actions decoded as the policy decodes them (greedy,
        constrained to action tokens, no rationale in context - for rationale-first models that is the action-only
        mode); `*_teacher_forced`: the same with the true previous tokens (and, in training's layout, the teacher's
        rationale) in context; `*_mean_action`: always predicting the training split's mean action. Plus token
        accuracies and the validation loss terms."""
        if not self.val_keys:
            return {}
        if hasattr(self.refinevla, "evaluate_for"):  # π0: continuous action chunks, its own metrics
            return self.refinevla.evaluate_for(self)
        cfg = self.config
        processor = self.refinevla.processor
        lay = processor.layout
        self.model.eval()
        counts = dict.fromkeys(("act_ok", "act_n", "rat_ok", "rat_n", "act_loss", "act_loss_n", "rat_loss"), 0.0)
        forced, free, truth = [], [], []
        for start in range(0, len(self.val_keys), cfg.batch_size):
            samples = [self.val_frames[i] for i in self.val_keys[start : start + cfg.batch_size]]
            loss, logits, batch = self._loss(self.collate(samples), cfg.lambda_rationale)
            counts["act_ok"] += loss.action_correct
            counts["act_n"] += loss.action_tokens
            counts["rat_ok"] += loss.rationale_correct
            counts["rat_n"] += loss.rationale_tokens
            counts["act_loss"] += float(loss.action) * (loss.action_tokens + loss.format_tokens)
            counts["act_loss_n"] += loss.action_tokens + loss.format_tokens
            counts["rat_loss"] += float(loss.rationale) * loss.rationale_tokens
            mask = batch["action_mask"][:, 1:]
            action_logits = logits[:, :-1][mask][:, lay.action_token_start : lay.action_token_end]
            bins = action_logits.argmax(-1).reshape(len(samples), -1).cpu().numpy()
            forced.append(processor.decode_actions(bins))
            generated = self.refinevla.generate([s.image for s in samples], [s.instruction for s in samples],
                                                plan="action")
            free.append(processor.decode_actions(np.stack([g.action_bins for g in generated])))
            truth.append(batch["actions"].cpu().numpy())
        actual = np.concatenate(truth)
        err = np.abs(np.concatenate(free) - actual)
        err_forced = np.abs(np.concatenate(forced) - actual)
        err_mean = np.abs(actual - self.stats.mean[None, :])
        metrics: dict[str, Any] = {
            "step": self.progress.step,
            "frames": len(err),
            "action_l1": float(err.mean()),
            "action_l1_xyz": float(err[:, :3].mean()),
            "action_l1_per_dim": [float(v) for v in err.mean(axis=0)],
            "action_l1_mean_action": float(err_mean.mean()),
            "action_l1_xyz_mean_action": float(err_mean[:, :3].mean()),
            "action_l1_teacher_forced": float(err_forced.mean()),
            "action_l1_xyz_teacher_forced": float(err_forced[:, :3].mean()),
            "action_token_accuracy_teacher_forced": counts["act_ok"] / max(counts["act_n"], 1),
            "val_loss_action": counts["act_loss"] / max(counts["act_loss_n"], 1),
        }
        if counts["rat_n"]:
            metrics["rationale_token_accuracy"] = counts["rat_ok"] / counts["rat_n"]
            metrics["val_loss_rationale"] = counts["rat_loss"] / counts["rat_n"]
        return metrics

    # ---- saving -----------------------------------------------------------------------------------------------
    def _extra_files(self) -> dict[str, Any]:
        return {
            "train_config.json": to_dict(self.config),
            "freeze_report.txt": (self.report.table() + "\n").encode(),  # bytes: save_checkpoint reads str as a path
            "train_progress.json": {"step": self.progress.step, "val": _finite(self.progress.val_history[-1:])},
        }

    def _save_model(self, directory: Path, full_state: dict[str, Any] | None = None) -> None:
        from refinevla_core.model.checkpoint import save_checkpoint

        if full_state is not None:  # FSDP: the parameters here are shards; write the gathered weights instead
            from refinevla_core.training.fsdp import save_from_full_state

            return save_from_full_state(self, directory, full_state)
        model = self.accelerator.unwrap_model(self.model)
        with export_for_saving(model.vlm) as plain:
            save_checkpoint(directory, plain, model.processor, self.stats, model.refinevla_config,
                            extra_files=self._extra_files())
        if self.config.lora.enabled and self.config.lora.save_adapter:
            self._save_adapter(model.vlm, directory / "lora_adapter")

    @staticmethod
    def _save_adapter(peft_model: Any, directory: Path) -> None:
        """The adapter alone (peft format) plus the new-token rows it needs; the merged folder above is the one
        Policy.from_checkpoint loads."""
        from safetensors.torch import save_file

        peft_model.save_pretrained(str(directory))
        rows = {n: p.detach().cpu().contiguous() for n, p in peft_model.named_parameters() if n.endswith(".rows")}
        if rows:
            save_file(rows, str(directory / "new_token_rows.safetensors"))

    def save_checkpoint(self) -> Path:
        acc = self.accelerator
        name = f"step-{self.progress.step:08d}"
        root = self.output_dir / CHECKPOINTS
        tmp = root / f".tmp-{name}"
        final = root / name
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "trainer_state").mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp / "trainer_state"))
        from refinevla_core.training.fsdp import gather_full_state_dict

        full_state = gather_full_state_dict(acc, self.model)  # FSDP: a collective (every process); else None
        if acc.is_main_process:
            self._save_model(tmp / "model", full_state)
            atomic_write_json(tmp / "trainer_state" / "train_config.json", to_dict(self.config))
            atomic_write_json(tmp / "trainer_state" / PROGRESS_NAME, self.progress.to_dict())
            if final.exists():
                shutil.rmtree(final)
            tmp.replace(final)
            _fsync_dir(root)
            for old in list_checkpoints(self.output_dir)[: -self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def write_metrics(self, final: bool = False) -> dict[str, Any]:
        cfg = self.config
        metrics = {
            "run": to_dict(cfg),
            "target_order": self.refinevla.refinevla_config.target_order,
            "freeze": {"table": self.report.table(), "trainable": self.report.trainable,
                       "frozen": self.report.frozen, "frozen_layers": self.report.frozen_layers,
                       "num_layers": self.report.num_layers},
            "data": {"train_frames": len(self.train_frames), "val_frames": len(self.val_frames),
                     "val_evaluated": len(self.val_keys),
                     "train_frames_with_rationale": self.train_frames.num_with_rationale,
                     "rationale_dropout": self.train_frames.rationale_dropout,
                     "rationales_shortened_share": self.truncated_share},
            "total_steps": self.total_steps,
            "step": self.progress.step,
            "finished": final,
            "train_seconds": round(self.progress.train_seconds, 3),
            "train": self.progress.train_history,
            "val": self.progress.val_history,
        }
        if self.accelerator.is_main_process:
            atomic_write_json(self.output_dir / METRICS_NAME, _finite(metrics))
            plot_loss_curve(self.progress.train_history, self.progress.val_history, self.output_dir / CURVE_NAME,
                            title=f"refinevla train ({cfg.preset}, λ_r = {cfg.lambda_rationale})")
        return metrics

    # ---- the loop ---------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        self._setup()
        cfg = self.config
        acc = self.accelerator
        if acc.is_main_process:
            save_config(cfg, self.output_dir / "train_config.yaml")
        from tqdm.auto import tqdm

        from refinevla_core.training.tracking import RunTracker

        tracker = RunTracker(acc, cfg, self.output_dir)

        bar = tqdm(total=self.total_steps, initial=self.progress.step, unit="step", dynamic_ncols=True,
                   disable=not (cfg.progress_bar and acc.is_main_process), desc="train")
        batches = self._batches()
        window: list[dict[str, float]] = []
        started = time.perf_counter()
        seconds_before = self.progress.train_seconds
        while self.progress.step < self.total_steps:
            row = self._train_step(batches)
            window.append(row)
            step = self.progress.step
            self.progress.train_seconds = seconds_before + time.perf_counter() - started
            bar.update(1)
            bar.set_postfix(L=f"{row['loss']:.3f}", act=f"{row['loss_action']:.3f}",
                            rat="-" if math.isnan(row["loss_rationale"]) else f"{row['loss_rationale']:.3f}")
            if step % cfg.log_every == 0 or step == self.total_steps:
                entry = {"step": step, "lr": float(self.scheduler.get_last_lr()[0])}
                for key in ("loss", "loss_action", "loss_rationale"):
                    values = [r[key] for r in window if not math.isnan(r[key])]
                    entry[key] = float(np.mean(values)) if values else float("nan")
                self.progress.train_history.append(entry)
                tracker.log_train(entry)
                window = []
            if step % cfg.eval_every == 0 or step == self.total_steps:
                val = self.evaluate()
                if val:
                    self.progress.val_history.append(val)
                    tracker.log_validation(val, step)
                    self.log(_describe_val(val))
            if step % cfg.save_every == 0 or step == self.total_steps:
                self.write_metrics()
                path = self.save_checkpoint()
                self.log(f"saved {path}")
        bar.close()
        final_dir = self.output_dir / "final"
        if acc.is_main_process:
            newest = list_checkpoints(self.output_dir)
            if newest and int(STEP_DIR.match(newest[-1].name).group(1)) == self.progress.step:
                _replace_dir(newest[-1] / "model", final_dir)
            else:
                self._save_model(final_dir)
        metrics = self.write_metrics(final=True)
        tracker.end()
        acc.wait_for_everyone()
        self.log(f"done: {self.progress.step} steps in {self.progress.train_seconds:.1f} s; model in {final_dir}")
        return TrainResult(self.output_dir, final_dir, metrics, self.resume_from, acc.is_main_process)


def train(config: TrainConfig, log: Callable[[str], None] | None = None) -> TrainResult:
    """Train (or resume) one run; see Trainer."""
    return Trainer(config, log=log).run()


# ---- helpers ---------------------------------------------------------------------------------------------------------
def _print_above_progress_bar(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


def _describe_val(val: dict[str, Any]) -> str:
    text = (f"step {val['step']}: val action L1 {val['action_l1']:.4f}, xyz {val['action_l1_xyz']:.4f} (as the "
            f"policy decodes; mean action: {val['action_l1_mean_action']:.4f}, xyz "
            f"{val['action_l1_xyz_mean_action']:.4f}; teacher-forced {val['action_l1_teacher_forced']:.4f})")
    if "rationale_token_accuracy" in val:
        text += f", rationale token acc {val['rationale_token_accuracy']:.3f}"
    return text


def _finite(obj: Any) -> Any:
    """JSON has no NaN: write null instead."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(source: Path, target: Path) -> None:
    """Copy a checkpoint folder to `target`, atomically replacing what is there."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:  # hard links: checkpoint files are never modified in place, so sharing them is safe and free
        shutil.copytree(source, tmp, copy_function=os.link)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
    from refinevla_core.model.checkpoint import swap_folder

    swap_folder(tmp, target)


def plot_loss_curve(train: list[dict[str, Any]], val: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Both loss terms (and the total) over steps, with validation losses as markers; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = [r["step"] for r in train]
    for key, label in (("loss", "total L"), ("loss_action", "L_action"), ("loss_rationale", "L_rationale")):
        values = [r.get(key) for r in train]
        if any(v is not None and math.isfinite(v) for v in values):
            ax.plot(steps, [v if v is not None else float("nan") for v in values], label=label)
    val_series = (("val_loss_action", "val L_action", "o"), ("val_loss_rationale", "val L_rationale", "s"))
    for key, label, marker in val_series:
        points = [(r["step"], r[key]) for r in val if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker=marker, linestyle="--", label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
