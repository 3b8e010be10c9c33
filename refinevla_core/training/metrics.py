"""What a run reports: the validation metrics, metrics.json (settings, freeze table, data sizes, loss and validation
history), the one-line validation summary and the loss-curve PNG. JSON has no NaN, so undefined values are null.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refinevla_core.io import atomic_write_bytes

METRICS_NAME = "metrics.json"
CURVE_NAME = "loss_curve.png"


def finite(obj: Any) -> Any:
    """JSON has no NaN: write null instead."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    return obj


def describe_val(val: dict[str, Any]) -> str:
    """The validation line the trainer prints at every evaluation."""
    text = (f"step {val['step']}: val action L1 {val['action_l1']:.4f}, xyz {val['action_l1_xyz']:.4f} (as the "
            f"policy decodes; mean action: {val['action_l1_mean_action']:.4f}, xyz "
            f"{val['action_l1_xyz_mean_action']:.4f}; teacher-forced {val['action_l1_teacher_forced']:.4f})")
    if "rationale_token_accuracy" in val:
        text += f", rationale token acc {val['rationale_token_accuracy']:.3f}"
    return text


@torch.no_grad()
def validation_metrics(trainer: Any) -> dict[str, Any]:
    """The PaliGemma family's held-out metrics (Trainer.evaluate describes them; π0: training_pi0.evaluate)."""
    cfg = trainer.config
    processor = trainer.refinevla.processor
    lay = processor.layout
    trainer.model.eval()
    counts = dict.fromkeys(("act_ok", "act_n", "rat_ok", "rat_n", "act_loss", "act_loss_n", "rat_loss"), 0.0)
    forced, free, truth = [], [], []
    for start in range(0, len(trainer.val_keys), cfg.batch_size):
        samples = [trainer.val_frames[i] for i in trainer.val_keys[start : start + cfg.batch_size]]
        loss, logits, batch = trainer.compute_loss(trainer.collate(samples), cfg.lambda_rationale)
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
        generated = trainer.refinevla.generate([s.image for s in samples], [s.instruction for s in samples],
                                               plan="action")
        free.append(processor.decode_actions(np.stack([g.action_bins for g in generated])))
        truth.append(batch["actions"].cpu().numpy())
    actual = np.concatenate(truth)
    err = np.abs(np.concatenate(free) - actual)
    err_forced = np.abs(np.concatenate(forced) - actual)
    err_mean = np.abs(actual - trainer.data_stats.mean[None, :])  # this data's mean, whatever the bins
    metrics: dict[str, Any] = {
        "step": trainer.progress.step,
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
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())
