"""What refinevla train asks of the π0 family: action-chunk samples, the collator, selective transfer (+ LoRA) and
validation metrics. The trainer (refinevla_core.training.trainer) calls these through RefineVLAPi0's methods.

Selective transfer on π0: SigLIP, the projector, the token embeddings and the lower K Gemma layers of the VLM are
frozen (freeze.*, as for the PaliGemma family); the action expert, its state/action/time projections and the upper
VLM layers train. The expert's own token embedding is never used by PI0 and stays frozen. With λ_r = 0 nothing reads
the VLM's output after its last layer's keys/values (the expert attends to the keys/values, the rationale head is
off), so that layer's query/output projections, MLP and the final norm are frozen too: they would get no gradient,
which DDP refuses. LoRA (lora.enabled) adapts the trainable VLM layers; the expert then still trains fully.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from refinevla_core.config import ConfigError
from refinevla_core.training.data import EpisodeFrames, TrainingSample
from refinevla_core.training.freezing import apply_lora, apply_selective_transfer, describe, find_parts

EXPERT_PREFIXES = ("model.dit.", "embed_action_time.", "action_out_proj.")
UNUSED = ("model.dit.embed_tokens.",)
LAST_LAYER_OUTPUT = ("self_attn.q_proj.", "self_attn.o_proj.", "mlp.", "post_attention_layernorm.")


@dataclass
class ChunkSample(TrainingSample):
    """A frame with the `chunk_size` actions from it on (past the episode end: the last action, masked)."""

    chunk: np.ndarray | None = None  # (chunk_size, 7)
    chunk_is_pad: np.ndarray | None = None  # (chunk_size,) bool


class ChunkFrames(EpisodeFrames):
    """EpisodeFrames whose samples carry the action chunk π0 is trained to predict."""

    def __init__(self, *args: Any, chunk_size: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.chunk_size = chunk_size

    def __getitem__(self, key: int | tuple[int, int]) -> ChunkSample:
        sample = super().__getitem__(key)
        actions = self._episode(sample.episode).actions
        steps = np.arange(sample.frame, sample.frame + self.chunk_size)
        is_pad = steps >= len(actions)
        chunk = np.asarray(actions)[np.minimum(steps, len(actions) - 1)].astype(np.float32)
        return ChunkSample(**vars(sample), chunk=chunk, chunk_is_pad=is_pad)


class ChunkCollator:
    """ChunkSamples -> the π0 processor's training batch (+ the frame's own action for validation L1)."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, samples: list[ChunkSample]) -> dict[str, torch.Tensor]:
        batch = self.processor.training_batch(
            [s.image for s in samples], [s.instruction for s in samples], np.stack([s.chunk for s in samples]),
            np.stack([s.chunk_is_pad for s in samples]), [s.rationale for s in samples])
        batch["frame_actions"] = torch.from_numpy(np.stack([s.action for s in samples]).astype(np.float32))
        return batch


def _starts(name: str, prefixes: tuple[str, ...]) -> bool:
    return name.startswith(prefixes)


def prepare_training(model: Any, config: Any) -> Any:
    """Freeze per config.freeze (+ LoRA), as described in the module docstring; returns the FreezeReport."""
    if config.gradient_checkpointing:
        raise ConfigError(
            "gradient_checkpointing is not available for π0: transformers' PI0 hands the VLM's keys/values to the "
            "action expert through a cache, which gradient checkpointing drops. Fit memory with more frozen layers "
            "(freeze.language_layers), lora.enabled=true, a smaller batch_size with grad_accumulation, or FSDP"
        )
    report = apply_selective_transfer(model.vlm, config.freeze, [])
    parts = find_parts(model.vlm)
    last = parts.layers[-1] + "."
    for name, p in model.vlm.named_parameters():
        if _starts(name, UNUSED) or (config.lambda_rationale == 0 and (
                name.startswith(f"{parts.language_model}.norm.")
                or any(name.startswith(last + part) for part in LAST_LAYER_OUTPUT))):
            p.requires_grad_(False)
    if config.lora.enabled:
        model.vlm = apply_lora(model.vlm, report, r=config.lora.r, alpha=config.lora.alpha,
                               dropout=config.lora.dropout, module_names=config.lora.target_modules)
        for name, p in model.vlm.named_parameters():
            plain = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            if _starts(plain, EXPERT_PREFIXES) and not _starts(plain, UNUSED) and "lora_" not in name:
                p.requires_grad_(True)
    rows = describe(model.vlm, None, report.frozen_layers)
    rows.rows = [("action expert" if g == "other" else g, t, f) for g, t, f in rows.rows]
    return rows


@torch.no_grad()
def evaluate(trainer: Any) -> dict[str, Any]:
    """Validation metrics for π0: the flow loss with fixed noise and times (comparable across evaluations), the
    rationale CE and token accuracy, and the L1 of the first sampled action (action-only inference) against the
    frame's action, next to the L1 of always predicting the training mean."""
    if not trainer.val_keys:
        return {}
    cfg = trainer.config
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.eval()
    sums = dict.fromkeys(("flow", "flow_n", "rat", "rat_n", "rat_ok"), 0.0)
    errors, truth = [], []
    generator = torch.Generator().manual_seed(cfg.seed)
    for start in range(0, len(trainer.val_keys), cfg.batch_size):
        samples = [trainer.val_frames[i] for i in trainer.val_keys[start : start + cfg.batch_size]]
        batch = trainer.collate(samples)
        n = len(samples)
        noise = torch.randn(batch["actions"].shape, generator=generator)
        timestep = torch.rand((n,), generator=generator) * 0.999 + 0.001
        with trainer.accelerator.autocast():
            out = model(**batch, lambda_rationale=cfg.lambda_rationale, noise=noise.to(model.device),
                        timestep=timestep.to(model.device))
            generated = model.generate([s.image for s in samples], [s.instruction for s in samples], plan="action",
                                       seed=cfg.seed + start)
        loss = out.joint_loss
        sums["flow"] += float(loss.action) * loss.action_tokens
        sums["flow_n"] += loss.action_tokens
        sums["rat"] += float(loss.rationale) * loss.rationale_tokens
        sums["rat_n"] += loss.rationale_tokens
        sums["rat_ok"] += loss.rationale_correct
        first = model.processor.decode_actions(np.stack([g.chunk[0] for g in generated]))
        actual = batch["frame_actions"].numpy()
        errors.append(np.abs(first - actual))
        truth.append(actual)
    err, actual = np.concatenate(errors), np.concatenate(truth)
    err_mean = np.abs(actual - trainer.data_stats.mean[None, :])  # this data's mean, whatever the bins
    metrics: dict[str, Any] = {
        "step": trainer.progress.step, "frames": len(err),
        "val_loss_action": sums["flow"] / max(sums["flow_n"], 1),  # the flow-matching loss
        "action_l1": float(err.mean()), "action_l1_xyz": float(err[:, :3].mean()),
        "action_l1_per_dim": [float(v) for v in err.mean(axis=0)],
        "action_l1_mean_action": float(err_mean.mean()), "action_l1_xyz_mean_action": float(err_mean[:, :3].mean()),
        "action_l1_teacher_forced": float("nan"),  # π0 samples continuous actions: there is no teacher forcing
    }
    if sums["rat_n"]:
        metrics["rationale_token_accuracy"] = sums["rat_ok"] / sums["rat_n"]
        metrics["val_loss_rationale"] = sums["rat"] / sums["rat_n"]
    return metrics
