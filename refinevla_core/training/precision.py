"""Parameter precision for training: trainable weights in fp32, frozen weights as loaded (bf16 on real sizes).

Why: accelerate's `mixed_precision="bf16"` only turns on autocast; it leaves the parameters in whatever dtype they
were loaded in. A bf16 checkpoint (the 3B presets load bf16) then gets its AdamW updates applied in bf16, whose 8-bit
mantissa rounds away every update smaller than half a unit in the last place: at lr 2e-5 most elements of a weight
of size ~0.02 never move. Keeping the *trainable* parameters (and the new-token rows) in fp32 makes them their own
master weights: autocast still runs the matmuls in bf16, the optimizer state and the updates are fp32. Frozen weights
receive no updates, so they stay in bf16 and cost half the memory. With precision "fp32" every parameter is fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class PrecisionReport:
    """What `apply_training_precision` did, for the run's log."""

    precision: str
    upcast_trainable: int = 0  # trainable elements moved to fp32
    upcast_frozen: int = 0  # frozen elements moved to fp32 (precision "fp32" only)
    frozen_low_precision: int = 0  # frozen elements left in bf16/fp16

    def describe(self) -> str:
        text = f"precision {self.precision}: trainable parameters in fp32"
        if self.upcast_trainable:
            text += f" ({self.upcast_trainable:,} elements upcast from bf16/fp16)"
        if self.frozen_low_precision:
            text += f"; {self.frozen_low_precision:,} frozen elements stay in bf16/fp16 (no updates, half the memory)"
        if self.upcast_frozen:
            text += f"; {self.upcast_frozen:,} frozen elements upcast (precision fp32 computes in fp32)"
        return text


def apply_training_precision(model: nn.Module, precision: str) -> PrecisionReport:
    """Cast in place: every trainable parameter to fp32; with precision "fp32" also the frozen ones.

    Call after freezing (requires_grad decides) and before the optimizer is built (it must hold the fp32 tensors).
    Shared (tied) parameters are cast once, so ties survive.
    """
    report = PrecisionReport(precision)
    seen: set[int] = set()
    for p in model.parameters():  # parameters() yields a shared tensor once
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.dtype == torch.float32 or not p.is_floating_point():
            continue
        if p.requires_grad:
            report.upcast_trainable += p.numel()
        elif precision == "fp32":
            report.upcast_frozen += p.numel()
        else:
            report.frozen_low_precision += p.numel()
            continue
        p.data = p.data.float()
    return report


def trainable_dtypes(model: nn.Module) -> dict[torch.dtype, int]:
    """Elements per dtype among the trainable parameters (a check: all fp32 after apply_training_precision)."""
    out: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.requires_grad:
            out[p.dtype] = out.get(p.dtype, 0) + p.numel()
    return out


def smallest_visible_adam_step(weights: torch.Tensor, lr: float) -> torch.Tensor:
    """Per element, True where an update of size `lr` survives rounding in the weights' own dtype.

    Adam's first step moves every element with |g| >> eps by ~lr (m/sqrt(v) = sign(g)). An update survives when it
    exceeds half the spacing of representable numbers around the weight (round to nearest): |w| * 2^-(mantissa+1).
    Used by the tests to say which elements *must* change.
    """
    mantissa = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}[weights.dtype]
    half_ulp = weights.detach().float().abs() * 2.0 ** -(mantissa + 1)
    return lr > half_ulp
