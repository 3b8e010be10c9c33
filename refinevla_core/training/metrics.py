"""What a run reports: metrics.json (settings, freeze table, data sizes, loss and validation history), the one-line
validation summary and the loss-curve PNG. JSON has no NaN, so undefined values are written as null.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

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
