"""GPU readiness: inference rate (action-only, a rationale every N steps) and one selective training step, with peak
memory, for both model families at real size with random weights in bf16.

Why: what a user needs to know before renting a GPU — does PaliGemma2-3B act at control rate (goal ≥ 15 Hz
action-only), is a π0 chunk fast enough to re-plan (goal ≤ 100 ms), and does one selective-transfer step of each fit
(bf16 compute, fp32 master weights for what trains). Random weights: no download and the same compute as the real
checkpoints (a random model never ends its rationale, so every fresh rationale runs to --max-rationale-tokens).

On CUDA the default sizes are the real ones (paligemma2-3b-224-random, pi0-base-random); on CPU the tiny presets
(tiny, pi0-tiny), so the command itself is tested without a GPU. Peak memory is torch.cuda.max_memory_allocated on
CUDA, the process's peak RSS growth on CPU. Ratios: every_N and the training step are also given relative to
action-only inference of the same model in the same run.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

from refinevla_core.data.stats import ActionStats
from refinevla_core.training.config import FreezeConfig, LoRAConfig

SIZES = {"real": {"paligemma": "paligemma2-3b-224-random", "pi0": "pi0-base-random"},
         "tiny": {"paligemma": "tiny", "pi0": "pi0-tiny"}}
# the selective transfer of the shipped real-size training configs (train_paligemma2_3b.yaml, train_pi0_base.yaml)
FREEZE_LAYERS = {"real": {"paligemma": 24, "pi0": 14}, "tiny": {"paligemma": 2, "pi0": 1}}
GOALS = {"paligemma": ("action_only", "hz", 15.0, ">="), "pi0": ("chunk", "mean_ms", 100.0, "<=")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--size", choices=("auto", "real", "tiny"), default="auto",
                        help="real (3B-class) or tiny models (default: real on CUDA, tiny on CPU)")
    parser.add_argument("--families", default="paligemma,pi0", help="comma-separated: paligemma, pi0")
    parser.add_argument("--steps", type=int, default=20, help="measured steps per measurement (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps first (default 3)")
    parser.add_argument("--every-n", type=int, default=10, help="a fresh rationale every N steps (default 10)")
    parser.add_argument("--max-rationale-tokens", type=int, default=32, help="rationale length (default 32)")
    parser.add_argument("--train-batch", type=int, default=8, help="batch size of the training step (default 8)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")


class Memory:
    """Peak memory of a phase: CUDA allocator peak, or peak RSS growth of the process on CPU."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def start(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def peak_gib(self) -> float:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**30
        return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.rss0) / 2**20


@dataclass
class Bench:
    """What every measurement of a run shares."""

    args: argparse.Namespace
    images: list[np.ndarray]
    memory: Memory


def _timed(fn: Any, steps: int, warmup: int, device: str) -> list[float]:
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _row(family: str, preset: str, what: str, times: list[float], memory: float, **extra: Any) -> dict[str, Any]:
    mean = statistics.mean(times)
    return {"family": family, "preset": preset, "measure": what, "steps": len(times), "mean_ms": mean,
            "median_ms": statistics.median(times), "hz": 1e3 / mean, "peak_gib": memory, **extra}


def _inference(family: str, preset: str, model: Any, bench: Bench) -> list[dict[str, Any]]:
    args, images, memory = bench.args, bench.images, bench.memory
    from refinevla_core.inference.policy import Policy, PolicyConfig

    instruction = "put the spoon on the towel"
    rows = []
    modes = [("action_only", PolicyConfig(rationale_mode="action_only")),
             (f"every_{args.every_n}", PolicyConfig(rationale_mode="every_n", rationale_every_n=args.every_n,
                                                   max_rationale_tokens=args.max_rationale_tokens))]
    for name, config in modes:
        if family == "pi0":
            from refinevla_core.inference.policy_pi0 import Pi0Policy

            policy: Any = Pi0Policy(model, config)
        else:
            policy = Policy(model, config)
        counter = iter(range(10**9))
        memory.start()
        times = _timed(lambda p=policy, c=counter: p.predict(images[next(c) % len(images)], instruction),
                       args.steps, args.warmup, args.device)
        rows.append(_row(family, preset, name, times, memory.peak_gib()))
    if family == "pi0":  # what re-planning costs: one chunk (VLM prefix + num_inference_steps expert passes)
        memory.start()
        times = _timed(lambda: model.generate(images[:1], [instruction], plan="action"), args.steps, args.warmup,
                       args.device)
        rows.append(_row(family, preset, "chunk", times, memory.peak_gib(),
                         note=f"{model.refinevla_config.chunk_size} actions, "
                              f"{model.refinevla_config.num_inference_steps} flow steps"))
    return rows


def _train_step(family: str, preset: str, model: Any, bench: Bench, freeze_layers: int) -> dict[str, Any]:
    import torch

    from refinevla_core.training.freezing import apply_selective_transfer
    from refinevla_core.training.loss import joint_loss
    from refinevla_core.training.precision import apply_training_precision

    args, images, memory = bench.args, bench.images, bench.memory
    n = args.train_batch
    rationales = ["Observation: a spoon lies left of the towel. Task Planning: grasp the spoon, move right."] * n
    instructions = ["put the spoon on the towel"] * n
    imgs = [images[i % len(images)] for i in range(n)]
    rng = np.random.default_rng(1)
    if family == "pi0":
        config = SimpleNamespace(freeze=FreezeConfig(language_layers=freeze_layers, new_token_rows="none"),
                                 lora=LoRAConfig(), lambda_rationale=0.3, gradient_checkpointing=False)
        report = model.prepare_training(config)
        chunk = model.refinevla_config.chunk_size
        batch = model.processor.training_batch(imgs, instructions, rng.normal(0, 0.3, (n, chunk, 7)),
                                               np.zeros((n, chunk), bool), rationales)
    else:
        from refinevla_core.training.trainer import new_token_ids

        report = apply_selective_transfer(model.vlm, FreezeConfig(language_layers=freeze_layers),
                                          new_token_ids(model))
        batch = model.processor.training_batch(imgs, instructions, rng.uniform(-0.5, 0.5, (n, 7)), rationales)
    apply_training_precision(model.vlm, "bf16")
    params = [p for p in model.vlm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    batch = {k: v.to(args.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    device_type = "cuda" if args.device.startswith("cuda") else "cpu"
    model.train()

    def step() -> None:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            if family == "pi0":
                loss = model(**batch, lambda_rationale=0.3).joint_loss.total
            else:
                out = model(**batch)
                loss = joint_loss(out.logits, batch["labels"], batch["action_mask"], batch["rationale_mask"], 0.3,
                                  format_mask=batch.get("format_mask")).total
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    memory.start()
    times = _timed(step, max(2, args.steps // 4), 1, args.device)
    model.eval()
    return _row(family, preset, "train_step", times, memory.peak_gib(), batch=n, trainable=report.trainable,
                frozen=report.frozen)


def _goal_lines(table: list[dict[str, Any]], cuda: bool) -> list[str]:
    lines = []
    for family, (measure, key, bound, op) in GOALS.items():
        row = next((r for r in table if r["family"] == family and r["measure"] == measure), None)
        if row is None:
            continue
        value = row[key]
        met = value >= bound if op == ">=" else value <= bound
        unit = "Hz" if key == "hz" else "ms"
        verdict = ("met" if met else "NOT met") if cuda else "not applicable (not measured on a GPU)"
        lines.append(f"- {family} {measure}: {value:.1f} {unit} (goal {op} {bound:g} {unit} on an H100-class GPU "
                     f"in bf16): {verdict}")
    return lines


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from refinevla_core.model.presets import build_from_preset

    torch.set_num_threads(args.threads)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = args.device.startswith("cuda")
    size = args.size if args.size != "auto" else ("real" if cuda else "tiny")
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = sorted(set(families) - set(SIZES[size]))
    if unknown:
        raise SystemExit(f"refinevla bench gpu: unknown families {unknown}; choose from {sorted(SIZES[size])}")
    memory = Memory(args.device)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (224, 224, 3), dtype=np.uint8) for _ in range(4)]
    bench = Bench(args, images, memory)
    table: list[dict[str, Any]] = []
    parameters: dict[str, int] = {}
    for family in families:
        preset = SIZES[size][family]
        dtype = {"dtype": "bfloat16"} if cuda else None
        model = build_from_preset(preset, overrides=dtype)
        model.processor.set_action_stats(ActionStats.identity())  # random model: never deploy it
        model.vlm.to(args.device)
        parameters[preset] = sum(p.numel() for p in model.vlm.parameters())
        rows = _inference(family, preset, model, bench)
        base = rows[0]["mean_ms"]
        rows.append(_train_step(family, preset, model, bench, FREEZE_LAYERS[size][family]))
        for row in rows:
            row["ratio_vs_action_only"] = row["mean_ms"] / base
        table += rows
        del model
        if cuda:
            torch.cuda.empty_cache()
    device = f"{args.device} ({torch.cuda.get_device_name(0)})" if cuda else f"cpu, {args.threads} thread(s)"
    summary = "\n".join([
        f"Models: {', '.join(f'{p} ({n / 1e9:.2f}B parameters)' for p, n in parameters.items())}; random weights, "
        f"{'bf16' if cuda else 'the presets dtype (CPU: tiny sizes)'}, device {device}. Inference through Policy / "
        f"Pi0Policy: action_only and every_{args.every_n} (a fresh {args.max_rationale_tokens}-token rationale every "
        f"{args.every_n} steps); for π0 a step executes one action of a chunk (re-planning every execute_steps) and "
        "`chunk` is one re-plan. train_step: one selective-transfer step (shipped real-size freezing; bf16 autocast, "
        f"fp32 master weights, AdamW), batch {args.train_batch}, λ_r = 0.3. peak_gib: "
        f"{'torch.cuda.max_memory_allocated' if cuda else 'peak RSS growth of the process'} during that measurement.",
        "", "Goals:", *_goal_lines(table, cuda)])
    return {"summary": summary, "table": table, "device": device, "size": size, "parameters": parameters}
