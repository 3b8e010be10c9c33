"""Training cost of selective transfer: full fine-tune vs selective (vision + lower 75 % frozen) vs LoRA, same batch.

Why: the point of freezing the vision tower and the lower layers is cheaper steps and less memory; this measures both
as ratios to full fine-tuning in the same run, on the same machine, with the same batch (goals: selective <= 0.6x
step time and <= 0.7x peak memory).

How, honestly:
  - every mode runs in its own fresh subprocess (a process's allocator never returns all memory, so modes measured
    one after another in one process would see each other's leftovers);
  - memory = peak resident set size during the training steps minus the resident size just before them (model,
    batch and optimizer built); the kernel's high-water mark is reset first (/proc/self/clear_refs), so the peak of
    building the model does not count. It covers activations, gradients and the optimizer state (created at the
    first step). On CUDA: torch.cuda.max_memory_allocated minus memory_allocated before the steps;
  - time = forward + joint loss + backward + AdamW step, after one warm-up step, with torch on one thread. On CPU the
    ratios use the process's CPU time per step (time.process_time): on a shared machine wall time swings 2x with the
    neighbours' load while the CPU time of single-threaded work does not; wall times are reported next to them. On
    CUDA the ratios use wall time (synchronised). Modes alternate over rounds.
The step is the trainer's own: refinevla_core.training.freezing (selective transfer, new-token head rows, LoRA) and
refinevla_core.training.loss.joint_loss on a processor.training_batch with a rationale.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# mode -> (freeze config, LoRA on?)
MODES: dict[str, dict[str, Any]] = {
    "full": {"freeze": {"vision": False, "projector": False, "embeddings": False, "language_layers": 0},
             "lora": False},
    "selective": {"freeze": {"vision": True, "projector": True, "embeddings": True, "language_layers": 0.75,
                             "new_token_rows": "head"}, "lora": False},
    "selective_tied_rows": {"freeze": {"vision": True, "projector": True, "embeddings": True, "language_layers": 0.75,
                                       "new_token_rows": "tied"}, "lora": False},
    "lora": {"freeze": {"vision": True, "projector": True, "embeddings": True, "language_layers": 0.75,
                        "new_token_rows": "head"}, "lora": True},
}
DEFAULT_MODES = ("full", "selective", "lora", "selective_tied_rows")
GOALS = {"selective": {"time": 0.6, "memory": 0.7}}
RATIONALE_WORDS = 40


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="mid", help="model preset (default mid: ~40M parameters, 224 px)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode and round (after 1 warm-up)")
    parser.add_argument("--rounds", type=int, default=2, help="each mode runs once per round, in a fresh process")
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"comma list of {', '.join(MODES)}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="autocast dtype of the step (the preset's weight dtype is kept)")


# ---- one mode, in its own process ------------------------------------------------------------------------------------
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


def measure_mode(spec: dict[str, Any]) -> dict[str, Any]:
    """Build, freeze, and time `spec["steps"]` training steps; runs inside the worker process."""
    import gc
    import resource

    import numpy as np
    import torch

    from refinevla_core.data.stats import ActionStats
    from refinevla_core.model.presets import build_from_preset
    from refinevla_core.rationale import Rationale
    from refinevla_core.training.config import FreezeConfig
    from refinevla_core.training.freezing import apply_lora, apply_selective_transfer, describe
    from refinevla_core.training.loss import joint_loss
    from refinevla_core.training.trainer import new_token_ids

    torch.set_num_threads(spec["threads"])
    mode = MODES[spec["mode"]]
    model = build_from_preset(spec["preset"], seed=0)
    model.processor.set_action_stats(ActionStats.identity())
    report = apply_selective_transfer(model.vlm, FreezeConfig(**mode["freeze"]), new_token_ids(model))
    if mode["lora"]:
        model.vlm = apply_lora(model.vlm, report, r=16, alpha=32, dropout=0.0,
                               module_names=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"])
    counts = describe(model.vlm)
    device = torch.device(spec["device"])
    model.to(device).train()

    rng = np.random.default_rng(0)
    n = spec["batch_size"]
    size = model.processor.image_size
    words = " ".join(["cube"] * RATIONALE_WORDS)
    rationale = Rationale(f"a red {words}", "the gripper is open above the table", "the cube is left of the gripper",
                          "move left, lower, close the gripper")
    batch = model.processor.training_batch(
        [rng.integers(0, 255, (size[0], size[1], 3), dtype=np.uint8) for _ in range(n)], ["push the red cube"] * n,
        rng.uniform(-0.5, 0.5, (n, 7)), [rationale] * n,
    )
    batch = {k: v.to(device) for k, v in batch.items()}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["precision"] == "bf16")

    gc.collect()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mb = torch.cuda.memory_allocated() / 2**20
    rss_base = _rss_mb("VmRSS")
    reset_ok = _reset_peak_rss()
    times, cpu_times, losses = [], [], []
    for _ in range(1 + spec["steps"]):
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
    if cuda:
        peak_mb = torch.cuda.max_memory_allocated() / 2**20 - base_mb
        memory_method = "torch.cuda.max_memory_allocated - memory_allocated before the steps"
    elif reset_ok and rss_base is not None:
        peak_mb = _rss_mb("VmHWM") - rss_base
        memory_method = "VmHWM (reset before the steps) - VmRSS before the steps"
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 - (rss_base or 0.0)
        memory_method = "ru_maxrss - VmRSS before the steps (includes the build peak: upper bound)"
    return {
        "mode": spec["mode"], "step_s": times[1:], "step_cpu_s": cpu_times[1:], "warmup_s": times[0],
        "peak_mb": peak_mb,
        "rss_before_mb": rss_base, "memory_method": memory_method, "trainable": counts.trainable,
        "total": counts.trainable + counts.frozen, "seq_len": int(batch["input_ids"].shape[1]),
        "losses": losses, "device": str(device),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
    }


def _worker(spec_json: str) -> None:
    result = measure_mode(json.loads(spec_json))
    print("RESULT " + json.dumps(result), flush=True)


# ---- the benchmark ---------------------------------------------------------------------------------------------------
def _run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "refinevla_core.bench.train", "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=3600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench train: mode {spec['mode']} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def run(args: argparse.Namespace) -> dict[str, Any]:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or "full" not in modes:
        raise SystemExit(f"bench train: --modes must include 'full' (the baseline) and only {list(MODES)}; "
                         f"got {modes}")
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for mode in modes:
            spec = {"mode": mode, "preset": args.preset, "batch_size": args.batch_size, "steps": args.steps,
                    "threads": args.threads, "device": args.device, "precision": args.precision}
            res = _run_worker(spec)
            results[mode].append(res)
            print(f"round {r + 1}/{args.rounds} {mode}: step {statistics.median(res['step_s']):.3f} s wall, "
                  f"{statistics.median(res['step_cpu_s']):.3f} s CPU, peak +{res['peak_mb']:.0f} MB",
                  file=sys.stderr, flush=True)
    on_cpu = args.device == "cpu"

    def agg(mode: str) -> dict[str, float]:
        wall = [s for res in results[mode] for s in res["step_s"]]
        cpu = [s for res in results[mode] for s in res["step_cpu_s"]]
        timed = cpu if on_cpu else wall
        return {"median_s": statistics.median(timed), "min_s": min(timed), "wall_median_s": statistics.median(wall),
                "peak_mb": max(res["peak_mb"] for res in results[mode])}

    base = agg("full")
    table, rows = [], {}
    for mode in modes:
        a = agg(mode)
        first = results[mode][0]
        row = {
            "mode": mode,
            "trainable params": f"{first['trainable']:,}",
            "trainable %": round(100.0 * first["trainable"] / first["total"], 2),
            ("step CPU ms (median)" if on_cpu else "step ms (median)"): round(1000 * a["median_s"], 1),
            ("step CPU ms (min)" if on_cpu else "step ms (min)"): round(1000 * a["min_s"], 1),
            "step wall ms (median)": round(1000 * a["wall_median_s"], 1),
            "peak MB above baseline": round(a["peak_mb"], 1),
            "time vs full": round(a["median_s"] / base["median_s"], 3),
            "memory vs full": round(a["peak_mb"] / base["peak_mb"], 3),
        }
        table.append(row)
        rows[mode] = row
    goals = {}
    for mode, goal in GOALS.items():
        if mode in rows:
            goals[mode] = {"time_goal": goal["time"], "memory_goal": goal["memory"],
                           "time_ok": rows[mode]["time vs full"] <= goal["time"],
                           "memory_ok": rows[mode]["memory vs full"] <= goal["memory"]}
    first_full = results["full"][0]
    timing = "CPU time per step (wall time swings with other load)" if on_cpu else "wall time per step"
    where = first_full["gpu"] or f"CPU, {args.threads} torch thread(s)"
    parts = [f"Preset {args.preset} ({first_full['total']:,} parameters), batch {args.batch_size} x "
             f"{first_full['seq_len']} tokens (image + prompt + ~{RATIONALE_WORDS + 25}-word rationale + 7 actions), "
             f"{args.precision}, {where}; {args.rounds} rounds x {args.steps} timed steps per mode, each mode in a "
             f"fresh process. Time ratios: {timing}. Memory: {first_full['memory_method']}."]
    for mode, g in goals.items():
        parts.append(
            f"{mode}: {rows[mode]['time vs full']}x time (goal <= {g['time_goal']}x: "
            f"{'met' if g['time_ok'] else 'NOT met'}), {rows[mode]['memory vs full']}x memory "
            f"(goal <= {g['memory_goal']}x: {'met' if g['memory_ok'] else 'NOT met'})."
        )
    if "selective_tied_rows" in rows:
        parts.append(
            f"selective_tied_rows (new-token rows shared by input and output, so the backward pass runs through "
            f"every frozen layer): {rows['selective_tied_rows']['time vs full']}x time, "
            f"{rows['selective_tied_rows']['memory vs full']}x memory — why the trainer's default trains only the "
            "output rows (freeze.new_token_rows = head)."
        )
    return {
        "summary": " ".join(parts),
        "table": table,
        "goals": goals,
        "settings": {"preset": args.preset, "batch_size": args.batch_size, "steps": args.steps,
                     "rounds": args.rounds, "threads": args.threads, "device": args.device,
                     "precision": args.precision},
        "raw": results,
    }


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
    else:
        print("usage: refinevla bench train [--preset mid] ... (this module's --worker is internal)", file=sys.stderr)
        sys.exit(2)
