"""The training loop: selective transfer + joint loss on accelerate, resumable after kill -9, with validation,
a progress bar showing both loss terms, a metrics JSON and a loss-curve PNG per run.

Why accelerate: `python -m refinevla_core train ...` runs on one device, and the very same entry point under
`accelerate launch --multi_gpu ...` (DDP) or an FSDP accelerate config runs on many; its save_state/load_state
restore model, optimizer, scheduler and every RNG (python, numpy, torch, CUDA) per process.

Output folder (run_folder.py has the checkpoint layout):

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
uninterrupted run would. The model, accelerator and optimizer are built in build.py, metrics and plots written by
metrics.py.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from refinevla_core.config import ConfigError, save_config, to_dict
from refinevla_core.data.episode import DataError
from refinevla_core.data.episode_dataset import EpisodeDataset
from refinevla_core.data.stats import ActionStats, compute_stats, load_dataset_stats, share_outside_range
from refinevla_core.io import atomic_write_json
from refinevla_core.model.checkpoint import save_checkpoint as save_model_checkpoint
from refinevla_core.model.checkpoint import save_tied_weights_quietly
from refinevla_core.training import fsdp, precision
from refinevla_core.training.build import (
    Collator,
    build_model,
    check_distributed_type,
    check_model_source,
    freeze_for_training,
    make_accelerator,
    make_optimizer,
    make_scheduler,
    new_token_ids,
    refinevla_checkpoint_folder,
)
from refinevla_core.training.config import TrainConfig
from refinevla_core.training.data import (
    EpisodeFrames,
    ResumableBatchSampler,
    split_episodes,
    training_split_actions,
    validation_indices,
)
from refinevla_core.training.freezing import FreezeReport, export_for_saving
from refinevla_core.training.loss import joint_loss
from refinevla_core.training.metrics import (
    CURVE_NAME,
    METRICS_NAME,
    describe_val,
    finite,
    plot_loss_curve,
    validation_metrics,
)
from refinevla_core.training.run_folder import (
    CHECKPOINTS,
    TRAINER_STATE,
    Progress,
    check_resume_compatible,
    clean_partial_checkpoints,
    finish_checkpoint,
    list_checkpoints,
    replace_dir,
    resume_point,
    save_adapter,
    start_checkpoint,
    step_of,
)
from refinevla_core.training.tracking import RunTracker

__all__ = [  # the public names importers have always found here
    "CHECKPOINTS", "CURVE_NAME", "METRICS_NAME", "Collator", "Progress", "TrainResult", "Trainer", "build_model",
    "check_distributed_type", "list_checkpoints", "new_token_ids", "plot_loss_curve", "refinevla_checkpoint_folder",
    "train",
]

TRUNCATION_WARN_SHARE = 0.1  # above this share of shortened rationales the trainer warns
CLIPPED_WARN_SHARE = 0.05  # above this share of action values outside the base's bins the trainer warns


@dataclass
class TrainResult:
    output_dir: Path
    final_checkpoint: Path
    metrics: dict[str, Any]
    resumed_from: Path | None = None
    main_process: bool = True  # False on the other ranks of a multi-process (accelerate launch) run


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
    def setup(self) -> None:
        """Everything before the first step. Every check that can fail comes before anything is written: a bad
        config leaves no half-made run behind."""
        cfg = self.config
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        dataset = self._open_data()  # before the model: a missing dataset fails in a second
        check_model_source(cfg)
        self.resume_from = resume_point(cfg, self.output_dir)
        if self.resume_from is not None:
            check_resume_compatible(cfg, self.resume_from)
        # FSDP also for CPU processes when requested; no LoRA under FSDP
        self.accelerator = fsdp.prepare_fsdp(make_accelerator(cfg, self.output_dir), cfg)
        check_distributed_type(self.accelerator)
        from accelerate.utils import set_seed

        set_seed(cfg.seed)
        self._setup_model()
        self._setup_data(dataset)
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            for p in clean_partial_checkpoints(self.output_dir):
                self.log(f"removed the partial checkpoint {p} left by an interrupted save")
        self._setup_optimization()

    def _open_data(self) -> EpisodeDataset:
        if not self.config.dataset:
            raise ConfigError("dataset is not set; give dataset=<folder written by refinevla collect/convert>")
        dataset = EpisodeDataset(self.config.dataset)
        load_dataset_stats(dataset)  # DataError naming compute_dataset_stats when missing or stale: fail early
        return dataset

    def _setup_model(self) -> None:
        cfg, acc = self.config, self.accelerator
        self.refinevla = model = build_model(cfg)
        self.report: FreezeReport = freeze_for_training(model, cfg)
        source = f"from {cfg.base_checkpoint}" if cfg.base_checkpoint else "random init"
        self.log(f"refinevla train: {model.refinevla_config.name} model ({source}), "
                 f"target order {model.refinevla_config.target_order}, "
                 f"λ_r = {cfg.lambda_rationale}, rationale dropout {cfg.rationale_dropout:.0%}, "
                 f"{'LoRA r=' + str(cfg.lora.r) if cfg.lora.enabled else 'no LoRA'}, {cfg.precision}, "
                 f"{acc.num_processes} process(es) on {acc.device}")
        self.log(self.report.table())
        self.log(precision.apply_training_precision(model.vlm, cfg.precision).describe())  # fp32 master weights

    def _setup_data(self, dataset: EpisodeDataset) -> None:
        cfg, model = self.config, self.refinevla
        train_eps, val_eps = split_episodes(len(dataset), cfg.val_fraction, cfg.seed)
        actions = training_split_actions(dataset, train_eps)  # held-out actions never shape the bins
        self.data_stats = compute_stats(actions)
        self.stats = self._bin_stats(model.stats, actions)
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
        self._plan_steps()
        per_step = self.batches_per_step
        self.log(f"data: {len(train_eps)} train episodes ({len(self.train_frames)} frames, "
                 f"{self.train_frames.num_with_rationale} with a rationale), {len(val_eps)} validation episodes "
                 f"({len(self.val_frames)} frames, {len(self.val_keys)} evaluated); {self.total_steps} steps of "
                 f"{cfg.batch_size} x {cfg.grad_accumulation} x {self.accelerator.num_processes} "
                 f"= {self.total_steps * cfg.batch_size * per_step / len(self.train_frames):.2f} epochs")

    def _bin_stats(self, base: ActionStats | None, actions: np.ndarray) -> ActionStats:
        """The statistics that define the action bins (TrainConfig.action_stats). Re-fitting them on a small target
        dataset silently re-maps every action token the base learnt (on the demo's PushCube data dz's bins move from
        [-0.1, 0.1] to [-0.1, 0.002] m and dyaw's collapse to a point)."""
        choice, source = self.config.action_stats, self.config.base_checkpoint
        if choice == "base" and base is None:
            raise ConfigError(f"action_stats=base needs a base_checkpoint with action statistics (stats.json); "
                              f"{source or 'a random-init preset'} has none: use action_stats=dataset or auto")
        if choice == "dataset" or (choice == "auto" and base is None):
            return self.data_stats
        clipped = share_outside_range(actions, base)
        self.log(f"action statistics: the base's ({source}), so its action tokens keep their meaning; "
                 f"{clipped:.1%} of this data's action values fall outside its bins' range [q01, q99] and are "
                 "clipped")
        if clipped > CLIPPED_WARN_SHARE:
            self.log(f"warning: over {CLIPPED_WARN_SHARE:.0%} of the action values are clipped by the base's "
                     "statistics; if this robot's actions differ from the base's, set action_stats=dataset")
        return base

    def _plan_steps(self) -> None:
        """total_steps (max_steps, else epochs over the training split) and micro-batches per optimizer step."""
        cfg = self.config
        per_epoch = len(self.train_frames) // cfg.batch_size
        if per_epoch == 0:
            raise DataError(
                f"the training split has {len(self.train_frames)} frames, fewer than batch_size={cfg.batch_size}; "
                "lower batch_size or add episodes"
            )
        per_step = cfg.grad_accumulation * self.accelerator.num_processes
        if cfg.max_steps is not None:
            self.total_steps = cfg.max_steps
        else:
            self.total_steps = max(1, math.ceil(cfg.epochs * per_epoch / per_step))
        self.batches_per_step = per_step

    def _setup_optimization(self) -> None:
        cfg, acc, model = self.config, self.accelerator, self.refinevla
        optimizer = make_optimizer(model, cfg)
        self.scheduler = make_scheduler(optimizer, cfg, self.total_steps)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        acc.register_for_checkpointing(self.scheduler)  # stepped once per optimizer step, on every process
        save_tied_weights_quietly(acc)  # no "Removed shared tensor" alarm at every save
        self.collate = getattr(model, "collator", Collator)(model.processor)
        self.progress = Progress()
        if self.resume_from is not None:
            acc.load_state(str(self.resume_from / TRAINER_STATE))
            self.progress = Progress.load(self.resume_from)
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
    def compute_loss(self, batch: dict[str, torch.Tensor], lambda_rationale: float) -> Any:
        """(JointLoss, logits or None for π0, the batch on the device) of one collated batch."""
        device = self.accelerator.device
        batch = {k: v.to(device) for k, v in batch.items()}
        if getattr(self.refinevla, "family", None) == "pi0":  # computes its own joint loss (flow + λ_r · CE)
            return self.model(**batch, lambda_rationale=lambda_rationale).joint_loss, None, batch
        out = self.model(**batch)
        return joint_loss(out.logits, batch["labels"], batch["action_mask"], batch["rationale_mask"],
                          lambda_rationale, format_mask=batch.get("format_mask")), out.logits, batch

    def batches(self) -> Any:
        """The training batches from `progress.batches_consumed` on, this process's shard."""
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

    def train_step(self, batches: Any) -> dict[str, float]:
        cfg = self.config
        acc = self.accelerator
        sums = torch.zeros(4, dtype=torch.float64)  # action/rationale loss sums (token-weighted), token counts
        self.model.train()
        for k in range(cfg.grad_accumulation):
            batch = next(batches)
            sync = k == cfg.grad_accumulation - 1
            with nullcontext() if sync else acc.no_sync(self.model):
                loss, _, _ = self.compute_loss(batch, cfg.lambda_rationale)
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
        return validation_metrics(self)

    # ---- saving -----------------------------------------------------------------------------------------------
    def checkpoint_extra_files(self) -> dict[str, Any]:
        """What each saved model folder carries besides the model: the run's config, freeze table and progress."""
        return {
            "train_config.json": to_dict(self.config),
            "freeze_report.txt": (self.report.table() + "\n").encode(),  # bytes: save_checkpoint reads str as a path
            "train_progress.json": {"step": self.progress.step, "val": finite(self.progress.val_history[-1:])},
        }

    def _save_model(self, directory: Path, full_state: dict[str, Any] | None = None) -> None:
        if full_state is not None:  # FSDP: the parameters here are shards; write the gathered weights instead
            return fsdp.save_from_full_state(self, directory, full_state)
        model = self.accelerator.unwrap_model(self.model)
        with export_for_saving(model.vlm) as plain:
            save_model_checkpoint(directory, plain, model.processor, self.stats, model.refinevla_config,
                                  extra_files=self.checkpoint_extra_files())
        if self.config.lora.enabled and self.config.lora.save_adapter:
            save_adapter(model.vlm, directory / "lora_adapter")

    def save_checkpoint(self) -> Path:
        acc = self.accelerator
        tmp, final = start_checkpoint(self.output_dir, self.progress.step)
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / TRAINER_STATE).mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp / TRAINER_STATE))
        full_state = fsdp.gather_full_state_dict(acc, self.model)  # FSDP: a collective (every process); else None
        if acc.is_main_process:
            self._save_model(tmp / "model", full_state)
            finish_checkpoint(tmp, final, self.config, self.progress, self.output_dir)
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
            atomic_write_json(self.output_dir / METRICS_NAME, finite(metrics))
            plot_loss_curve(self.progress.train_history, self.progress.val_history, self.output_dir / CURVE_NAME,
                            title=f"refinevla train ({cfg.preset}, λ_r = {cfg.lambda_rationale})")
        return metrics

    # ---- the loop ---------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        self.setup()
        cfg = self.config
        acc = self.accelerator
        if acc.is_main_process:
            save_config(cfg, self.output_dir / "train_config.yaml")
        from tqdm.auto import tqdm

        tracker = RunTracker(acc, cfg, self.output_dir)
        bar = tqdm(total=self.total_steps, initial=self.progress.step, unit="step", dynamic_ncols=True,
                   disable=not (cfg.progress_bar and acc.is_main_process), desc="train")
        batches = self.batches()
        window: list[dict[str, float]] = []
        started = time.perf_counter()
        seconds_before = self.progress.train_seconds
        while self.progress.step < self.total_steps:
            row = self.train_step(batches)
            window.append(row)
            self.progress.train_seconds = seconds_before + time.perf_counter() - started
            bar.update(1)
            bar.set_postfix(L=f"{row['loss']:.3f}", act=f"{row['loss_action']:.3f}",
                            rat="-" if math.isnan(row["loss_rationale"]) else f"{row['loss_rationale']:.3f}")
            if self._after_step(window, tracker):
                window = []
        bar.close()
        final_dir = self._write_final()
        metrics = self.write_metrics(final=True)
        tracker.end()
        acc.wait_for_everyone()
        self.log(f"done: {self.progress.step} steps in {self.progress.train_seconds:.1f} s; model in {final_dir}")
        return TrainResult(self.output_dir, final_dir, metrics, self.resume_from, acc.is_main_process)

    def _after_step(self, window: list[dict[str, float]], tracker: RunTracker) -> bool:
        """Log, validate and save when due; True when the loss window was logged (and starts anew)."""
        cfg, step = self.config, self.progress.step
        last = step == self.total_steps
        logged = step % cfg.log_every == 0 or last
        if logged:
            entry: dict[str, float] = {"step": step, "lr": float(self.scheduler.get_last_lr()[0])}
            for key in ("loss", "loss_action", "loss_rationale"):
                values = [r[key] for r in window if not math.isnan(r[key])]
                entry[key] = float(np.mean(values)) if values else float("nan")
            self.progress.train_history.append(entry)
            tracker.log_train(entry)
        if step % cfg.eval_every == 0 or last:
            val = self.evaluate()
            if val:
                self.progress.val_history.append(val)
                tracker.log_validation(val, step)
                self.log(describe_val(val))
        if step % cfg.save_every == 0 or last:
            self.write_metrics()
            path = self.save_checkpoint()
            self.log(f"saved {path}")
        return logged

    def _write_final(self) -> Path:
        """final/: the last step's checkpoint model (hard-linked), or a fresh save when that step was not saved."""
        final_dir = self.output_dir / "final"
        if self.accelerator.is_main_process:
            newest = list_checkpoints(self.output_dir)
            if newest and step_of(newest[-1]) == self.progress.step:
                replace_dir(newest[-1] / "model", final_dir)
            else:
                self._save_model(final_dir)
        return final_dir


def train(config: TrainConfig, log: Callable[[str], None] | None = None) -> TrainResult:
    """Train (or resume) one run; see Trainer."""
    return Trainer(config, log=log).run()


def _print_above_progress_bar(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)
