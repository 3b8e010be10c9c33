"""Inference latency per control step: action-only vs a rationale every step vs every 10 steps, as ratios.

Why: chain-of-thought at every step is the known cost of reasoning VLAs (ECoT ~1 Hz); this measures what each
rationale mode costs on this machine, for both target orders, with the real Policy (KV-cache generate, grammar,
decoding). Ratios are against action-only measured in the same run, modes interleaved in rounds so that load from
other processes hits them alike.

The models are random-init presets (tiny and mid by default; `--presets paligemma2-3b-224-random --device cuda
--dtype bfloat16` for the real size on a GPU). A random model never ends its rationale by itself, so every fresh
rationale runs to `--max-rationale-tokens`: the numbers are for rationales of exactly that length.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np

from refinevla_core.data.stats import ActionStats

MODES = (("action_only", 1), ("every_step", 1), ("every_n", 10))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets", default="tiny,mid",
                        help="comma-separated model presets (default tiny,mid; paligemma2-3b-224-random on a GPU)")
    parser.add_argument("--steps", type=int, default=40, help="measured steps per mode and order (default 40)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds the steps are split into")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps per mode first")
    parser.add_argument("--max-rationale-tokens", type=int, default=64, help="rationale length (default 64)")
    parser.add_argument("--orders", default="rationale_then_action,action_then_rationale",
                        help="comma-separated target orders to measure")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: the preset's)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")


def _measure(policy: Any, images: list[np.ndarray], instruction: str, steps: int) -> list[dict[str, float]]:
    rows = []
    for i in range(steps):
        t0 = time.perf_counter()
        out = policy.predict(images[i % len(images)], instruction)
        wall = (time.perf_counter() - t0) * 1e3
        rows.append({"wall": wall, "action": out.timings_ms["action"], "fresh": float(out.rationale_fresh)})
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from refinevla_core.inference.policy import Policy, PolicyConfig
    from refinevla_core.model.presets import build_from_preset

    torch.set_num_threads(args.threads)
    overrides = {"dtype": args.dtype} if args.dtype else None
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (224, 224, 3), dtype=np.uint8) for _ in range(8)]
    instruction = "put the spoon on the towel"
    table: list[dict[str, Any]] = []
    per_round = max(1, args.steps // args.rounds)
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    orders = [o.strip() for o in args.orders.split(",") if o.strip()]
    parameters: dict[str, int] = {}
    for preset, order in [(p, o) for p in presets for o in orders]:
        model = build_from_preset(preset, target_order=order, overrides=overrides)
        model.processor.set_action_stats(ActionStats.identity())  # random model: no dataset; never deploy it
        model.vlm.to(args.device)
        policies = {
            mode: Policy(model, PolicyConfig(rationale_mode=mode, rationale_every_n=n,
                                             max_rationale_tokens=args.max_rationale_tokens))
            for mode, n in MODES
        }
        samples: dict[str, list[dict[str, float]]] = {mode: [] for mode in policies}
        for policy in policies.values():
            _measure(policy, images, instruction, args.warmup)
            policy.reset()
        for _ in range(args.rounds):
            for mode, policy in policies.items():
                samples[mode] += _measure(policy, images, instruction, per_round)
        base = statistics.mean(s["wall"] for s in samples["action_only"])
        for mode, rows in samples.items():
            walls = [s["wall"] for s in rows]
            mean = statistics.mean(walls)
            table.append({
                "preset": preset, "order": order, "mode": mode if mode != "every_n" else "every_10",
                "steps": len(rows), "mean_ms": mean, "median_ms": statistics.median(walls),
                "p90_ms": float(np.percentile(walls, 90)),
                "action_ready_ms": statistics.median(s["action"] for s in rows),
                "fresh_share": statistics.mean(s["fresh"] for s in rows),
                "hz": 1e3 / mean, "ratio_vs_action_only": mean / base,
            })
        parameters[preset] = model.num_parameters()
        del model, policies
    device = args.device
    if device.startswith("cuda"):
        device = f"{device} ({torch.cuda.get_device_name(0)})"
    summary = (
        "Presets " + ", ".join(f"{p} ({n / 1e6:.1f}M parameters)" for p, n in parameters.items())
        + f", random init, device {device}, "
        f"{args.threads} thread(s), rationales of {args.max_rationale_tokens} tokens, {args.steps} steps per mode in "
        f"{args.rounds} interleaved rounds. ratio_vs_action_only = mean step time / action-only mean step time of the "
        "same target order, same run. action_ready_ms = median time until the 7 action tokens were known "
        "(with action_then_rationale the rationale is written after them). every_10 = a fresh rationale every 10 "
        "steps, the cached one fed as a prefix (rationale_then_action) in between."
    )
    return {"summary": summary, "table": table, "device": device, "parameters": parameters,
            "max_rationale_tokens": args.max_rationale_tokens}
