"""One mode of `refinevla bench train`, measured in a fresh process: build and freeze the model, time its steps.

bench/train.py starts `python -m refinevla_core.bench.train_worker '<spec JSON>'` once per mode and round, so each
mode's memory is measured without the leftovers of another, and torch is imported here, not by `refinevla bench`.
The step is the trainer's own: refinevla_core.training.freezing and refinevla_core.training.loss.joint_loss.
"""

from __future__ import annotations

import gc
import json
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refinevla_core.bench.train import MODES, RATIONALE_WORDS
from refinevla_core.data.stats import ActionStats
from refinevla_core.model.presets import build_from_preset
from refinevla_core.rationale import Rationale
from refinevla_core.training.config import FreezeConfig
from refinevla_core.training.freezing import apply_lora, apply_selective_transfer, describe
from refinevla_core.training.loss import joint_loss
from refinevla_core.training.trainer import new_token_ids

LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def measure_mode(spec: dict[str, Any]) -> dict[str, Any]:
    """Build, freeze, and time `spec["steps"]` training steps (after one warm-up step)."""
    torch.set_num_threads(spec["threads"])
    model, counts = build_frozen_model(spec["preset"], MODES[spec["mode"]])
    device = torch.device(spec["device"])
    model.to(device).train()
    batch = {k: v.to(device) for k, v in training_batch(model, spec["batch_size"]).items()}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["precision"] == "bf16")

    gc.collect()
    cuda = device.type == "cuda"
    memory = MemoryBaseline.take(cuda)
    times, cpu_times, losses = timed_steps(model, batch, optimizer, autocast, steps=1 + spec["steps"], cuda=cuda)
    peak_mb, memory_method = memory.peak_above()
    return {
        "mode": spec["mode"], "step_s": times[1:], "step_cpu_s": cpu_times[1:], "warmup_s": times[0],
        "peak_mb": peak_mb,
        "rss_before_mb": memory.rss_mb, "memory_method": memory_method, "trainable": counts.trainable,
        "total": counts.trainable + counts.frozen, "seq_len": int(batch["input_ids"].shape[1]),
        "losses": losses, "device": str(device),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
    }


def build_frozen_model(preset: str, mode: dict[str, Any]) -> tuple[Any, Any]:
    """The preset's model with the mode's selective transfer (and LoRA), and its trainable/frozen counts."""
    model = build_from_preset(preset, seed=0)
    model.processor.set_action_stats(ActionStats.identity())
    report = apply_selective_transfer(model.vlm, FreezeConfig(**mode["freeze"]), new_token_ids(model))
    if mode["lora"]:
        model.vlm = apply_lora(model.vlm, report, r=16, alpha=32, dropout=0.0, module_names=LORA_MODULES)
    return model, describe(model.vlm)


def training_batch(model: Any, n: int) -> dict[str, torch.Tensor]:
    """`n` random images with an instruction, actions and a ~RATIONALE_WORDS-word rationale: a rationale-first
    sample of realistic length, so the joint loss has both terms."""
    rng = np.random.default_rng(0)
    size = model.processor.image_size
    words = " ".join(["cube"] * RATIONALE_WORDS)
    rationale = Rationale(f"a red {words}", "the gripper is open above the table", "the cube is left of the gripper",
                          "move left, lower, close the gripper")
    return model.processor.training_batch(
        [rng.integers(0, 255, (size[0], size[1], 3), dtype=np.uint8) for _ in range(n)], ["push the red cube"] * n,
        rng.uniform(-0.5, 0.5, (n, 7)), [rationale] * n,
    )


def timed_steps(model: Any, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, autocast: Any,
                *, steps: int, cuda: bool) -> tuple[list[float], list[float], list[float]]:
    """Wall and CPU seconds and the loss of each forward + joint loss + backward + AdamW step."""
    times, cpu_times, losses = [], [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        c0 = time.process_time()
        with autocast:
            out = model(**batch)
        loss = joint_loss(out.logits, batch["labels"], batch["action_mask"], batch["rationale_mask"], 0.3,
                          format_mask=batch["format_mask"])
        loss.total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        losses.append(float(loss.total.detach()))
        del out, loss
    return times, cpu_times, losses


@dataclass(frozen=True)
class MemoryBaseline:
    """Memory just before the steps, with the peak counters reset, so the peak of building the model is left out."""

    cuda: bool
    cuda_mb: float
    rss_mb: float | None
    peak_reset: bool

    @classmethod
    def take(cls, cuda: bool) -> MemoryBaseline:
        cuda_mb = 0.0
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            cuda_mb = torch.cuda.memory_allocated() / 2**20
        rss_mb = _rss_mb("VmRSS")
        return cls(cuda, cuda_mb, rss_mb, _reset_peak_rss())

    def peak_above(self) -> tuple[float, str]:
        """(peak MB above the baseline, how it was measured)."""
        if self.cuda:
            return (torch.cuda.max_memory_allocated() / 2**20 - self.cuda_mb,
                    "torch.cuda.max_memory_allocated - memory_allocated before the steps")
        if self.peak_reset and self.rss_mb is not None:
            return _rss_mb("VmHWM") - self.rss_mb, "VmHWM (reset before the steps) - VmRSS before the steps"
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 - (self.rss_mb or 0.0),
                "ru_maxrss - VmRSS before the steps (includes the build peak: upper bound)")


def _rss_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: refinevla bench train [--preset mid] ... (this module is its internal worker)", file=sys.stderr)
        sys.exit(2)
    print("RESULT " + json.dumps(measure_mode(json.loads(sys.argv[1]))), flush=True)
