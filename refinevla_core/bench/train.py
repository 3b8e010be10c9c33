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
refinevla_core.training.loss.joint_loss on a processor.training_batch with a rationale (bench/train_worker.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
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


# ---- the benchmark ---------------------------------------------------------------------------------------------------
def _run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "refinevla_core.bench.train_worker", json.dumps(spec)],
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
    results = _measure_rounds(args, modes)
    on_cpu = args.device == "cpu"
    base = _aggregate(results["full"], on_cpu)
    table = [_table_row(mode, results[mode], base, on_cpu) for mode in modes]
    rows = {row["mode"]: row for row in table}
    goals = {}
    for mode, goal in GOALS.items():
        if mode in rows:
            goals[mode] = {"time_goal": goal["time"], "memory_goal": goal["memory"],
                           "time_ok": rows[mode]["time vs full"] <= goal["time"],
                           "memory_ok": rows[mode]["memory vs full"] <= goal["memory"]}
    return {
        "summary": _summary(args, results["full"][0], rows, goals),
        "table": table,
        "goals": goals,
        "settings": {"preset": args.preset, "batch_size": args.batch_size, "steps": args.steps,
                     "rounds": args.rounds, "threads": args.threads, "device": args.device,
                     "precision": args.precision},
        "raw": results,
    }


def _measure_rounds(args: argparse.Namespace, modes: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Every mode once per round, each in a fresh worker process, alternating so slow drifts hit all modes."""
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
    return results


def _aggregate(runs: list[dict[str, Any]], on_cpu: bool) -> dict[str, float]:
    """A mode's step time over all its rounds (CPU time on CPU, wall time on CUDA) and its largest peak."""
    wall = [s for res in runs for s in res["step_s"]]
    cpu = [s for res in runs for s in res["step_cpu_s"]]
    timed = cpu if on_cpu else wall
    return {"median_s": statistics.median(timed), "min_s": min(timed), "wall_median_s": statistics.median(wall),
            "peak_mb": max(res["peak_mb"] for res in runs)}


def _table_row(mode: str, runs: list[dict[str, Any]], base: dict[str, float], on_cpu: bool) -> dict[str, Any]:
    a = _aggregate(runs, on_cpu)
    first = runs[0]
    return {
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


def _summary(args: argparse.Namespace, first_full: dict[str, Any], rows: dict[str, dict[str, Any]],
             goals: dict[str, dict[str, Any]]) -> str:
    """What was measured and how, then each goal met or not, then why the tied-rows variant is not the default."""
    timing = "CPU time per step (wall time swings with other load)" if args.device == "cpu" else "wall time per step"
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
    return " ".join(parts)
