"""The demo's evaluation stage: every model closed-loop THROUGH the ROS nodes (lanes: sim_bridge_node + policy_node
processes on private ROS domains), and the references in-process on the same seeds — the scripted expert (reads the
simulator state: shows the task is solvable) and a random policy (a floor).

This module never imports ROS: a lane is a separate process, `python -m LANE_MODULE --spec ...`, where LANE_MODULE
is the ROS package's `refinevla.demo_lanes` entry point "ros" (refinevla_core.plugins), so refinevla_core stays
usable without rclpy; without the ROS package the stage fails with a message saying so.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from refinevla_core.demo.cache import advance_bar
from refinevla_core.demo.config import CollectSettings, EvalSettings, ModelSettings, resolve_repo_path
from refinevla_core.demo.data import child_env
from refinevla_core.eval.runner import evaluate
from refinevla_core.eval.stats import success_rate
from refinevla_core.plugins import DEMO_LANES
from refinevla_core.plugins import require as require_plugin
from refinevla_core.sim.config import SimConfig
from refinevla_core.sim.experts import ScriptedExpertPolicy

POLL_S = 1.0


def sim_settings(collect: CollectSettings, settings: EvalSettings) -> dict[str, Any]:
    """The SimConfig of evaluation: the collection's task, camera and instructions (what the models were trained
    on), the evaluation's step limit."""
    return {"backend": "maniskill", "task": collect.task, "image_size": collect.image_size,
            "max_steps": settings.max_steps, "instruction_mode": collect.instruction_mode}


def loopback_env(log_dir: Path) -> dict[str, str]:
    """DDS restricted to this machine when the loopback profile is installed (the demo talks to nothing else); the
    nodes' ROS logs under the demo folder."""
    env = {**child_env(), "ROS_LOG_DIR": str(log_dir)}
    profile = os.environ.get("REFINEVLA_FASTDDS_LOOPBACK") or str(
        Path(sys.prefix) / "share" / "refinevla" / "fastdds_loopback.xml")
    if Path(profile).is_file():
        env["FASTRTPS_DEFAULT_PROFILES_FILE"] = profile
        env.pop("ROS_AUTOMATIC_DISCOVERY_RANGE", None)
    return env


def isolated(command: list[str]) -> tuple[list[str], str]:
    """`command` in a private network namespace holding only loopback when this system allows it (unshare -n as root,
    else unshare -rn in a user namespace): no other process on the machine — a test, another demo, a robot's nodes —
    can then share the lane's DDS traffic, whatever ROS domain it uses. Without unshare the lane still picks an empty
    ROS domain and checks it before every episode. Returns (command, how it is isolated)."""
    if shutil.which("unshare") and shutil.which("ip"):
        for flags in ("-n", "-rn"):
            probe = subprocess.run(["unshare", flags, "bash", "-c", "ip link set lo up"], capture_output=True)
            if probe.returncode == 0:
                wrapped = ["unshare", flags, "bash", "-c", 'ip link set lo up && exec "$0" "$@"', *command]
                return wrapped, "a private network namespace (loopback only)"
    return command, "the host network, on a ROS domain no other node uses (checked before every episode)"


def count_lines(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.strip().endswith("}"))
    except OSError:
        return 0


def start_lanes(lane_module: str, models: list[ModelSettings], checkpoints: dict[str, str], sim: dict[str, Any], *,
                settings: EvalSettings, eval_dir: Path) -> tuple[list[tuple[subprocess.Popen, Any, Path]], str]:
    """One `python -m <lane_module> --spec lane_k.json` process per lane (models dealt round-robin, each lane with
    its own candidate ROS domains): [(process, open log, log path)] and how the lanes are isolated."""
    lanes = max(1, min(settings.lanes, len(models)))
    domains = random.Random(f"{os.getpid()}:{time.time()}").sample(range(1, 101), 100)
    procs = []
    isolation = ""
    for k in range(lanes):
        lane_models = [m for i, m in enumerate(models) if i % lanes == k]
        if not lane_models:
            continue
        spec = {"sim": sim, "domains": domains[k::lanes], "step_timeout_s": settings.step_timeout_s,
                "work_dir": str(eval_dir / f"lane_{k}"),
                "models": [{"name": m.name, "checkpoint": checkpoints[m.name], "rationale_mode": m.eval_rationale_mode,
                            "rationale_every_n": settings.rationale_every_n, "seed": settings.seed,
                            "episodes": settings.episodes, "out_dir": str(eval_dir / m.name)} for m in lane_models]}
        spec_path = eval_dir / f"lane_{k}.json"
        spec_path.write_text(json.dumps(spec, indent=1))
        log = (eval_dir / f"lane_{k}.log").open("ab")
        command, isolation = isolated([sys.executable, "-m", lane_module, "--spec", str(spec_path)])
        log.write(f"[demo] lane {k} runs in {isolation}\n".encode())
        log.flush()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=loopback_env(eval_dir / "ros_logs"))
        procs.append((proc, log, eval_dir / f"lane_{k}.log"))
    return procs, isolation


def evaluate_models(models: list[ModelSettings], checkpoints: dict[str, str], collect: CollectSettings,
                    settings: EvalSettings, eval_dir: Path, *, progress: bool = True,
                    references: list[str] | None = None, reference_dir: Path | None = None) -> dict[str, Any]:
    """Run the lanes for `models` (and the references, in a worker process meanwhile); returns per-model summaries
    and, when asked, the references' summary."""
    from tqdm import tqdm

    lane_module = require_plugin(DEMO_LANES, "ros", "the closed-loop evaluation (it runs the ROS nodes)").module
    eval_dir.mkdir(parents=True, exist_ok=True)
    sim = sim_settings(collect, settings)
    procs, isolation = start_lanes(lane_module, models, checkpoints, sim, settings=settings, eval_dir=eval_dir)
    total = settings.episodes * len(models)
    bar = tqdm(total=total, desc="evaluate (ROS nodes)", unit="ep", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    pool: ProcessPoolExecutor | None = None
    future: Future | None = None
    if references:
        pool = ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"))
        future = pool.submit(run_references, references, sim, settings.seed, settings.reference_episodes,
                             str(reference_dir))
    try:
        while True:
            advance_bar(bar, min(total, sum(count_lines(eval_dir / m.name / "episodes.jsonl") for m in models)))
            if all(p.poll() is not None for p, _, _ in procs):
                break
            time.sleep(POLL_S)
        advance_bar(bar, min(total, sum(count_lines(eval_dir / m.name / "episodes.jsonl") for m in models)))
        for proc, log, path in procs:
            log.close()
            if proc.returncode != 0:
                raise RuntimeError(f"closed-loop evaluation lane failed (exit {proc.returncode}); log {path}:\n"
                                   f"{path.read_text(errors='replace')[-4000:]}")
        reference_summary = future.result() if future is not None else None
    finally:
        for proc, log, _ in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)
            log.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        bar.close()
    out = {"models": {m.name: summarise_model(eval_dir / m.name, m, settings) for m in models}}
    for summary in out["models"].values():
        summary["isolation"] = isolation
    if reference_summary is not None:
        out["references"] = reference_summary
    return out


def summarise_model(model_dir: Path, model: ModelSettings, settings: EvalSettings) -> dict[str, Any]:
    """Success with a Wilson 95 % interval, steps, and the policy node's per-step latency from episodes.jsonl."""
    records = [json.loads(line) for line in (model_dir / "episodes.jsonl").read_text().splitlines() if line.strip()]
    records = [r for r in records if r["seed"] in range(settings.seed, settings.seed + settings.episodes)]
    rate = success_rate(sum(r["success"] for r in records), len(records))
    final = success_rate(sum(r["final_success"] for r in records), len(records))
    latency = [ms for r in records for ms in r["latency_ms"]]
    fresh = [f for r in records for f in r["fresh_rationale"]]
    fresh_ms = [ms for ms, f in zip(latency, fresh, strict=True) if f]
    plain_ms = [ms for ms, f in zip(latency, fresh, strict=True) if not f]
    holds: dict[str, int] = {}
    for r in records:
        for reason, n in r["holds"].items():
            holds[reason] = holds.get(reason, 0) + n
    return {
        "model": model.name, "via": "ROS: sim_bridge_node + policy_node (separate processes, loopback DDS)",
        "rationale_mode": model.eval_rationale_mode, "rationale_every_n": settings.rationale_every_n,
        "successes": rate.successes, "trials": rate.trials, "success_rate": rate.rate,
        "wilson95": [rate.low, rate.high], "text": rate.text(), "final_successes": final.successes,
        "mean_steps": float(np.mean([r["steps"] for r in records])) if records else None,
        "policy_node_latency_ms": _latency(latency), "fresh_rationale_step_ms": _latency(fresh_ms),
        "other_step_ms": _latency(plain_ms), "holds": holds,
        # share of the rationales policy_node wrote in the closed loop that hold all four sections
        "rationale_parse_rate": (sum(r.get("rationales_parsed", 0) for r in records) / sum(fresh)) if any(fresh)
        else None,
        "duplicate_actions": sum(r["duplicate_actions"] for r in records),
        "first_steps_before_instruction": sum(bool(r["first_step_before_instruction"]) for r in records),
        "first_step_resets": sum(r["first_step_resets"] for r in records),
        "rationale_examples": [{"seed": r["seed"], **x} for r in records[:2] for x in r["rationales"][:3]],
        "episodes": [{k: r[k] for k in ("seed", "success", "final_success", "steps", "wall_s", "instruction")}
                     for r in records],
    }


def _latency(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    a = np.asarray(values, dtype=np.float64)
    return {"n": len(a), "mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
            "p90": float(np.percentile(a, 90)), "max": float(a.max())}


def run_references(names: list[str], sim: dict[str, Any], seed: int, episodes: int, out_dir: str) -> dict[str, Any]:
    """The scripted expert and a random policy in-process on the evaluation seeds (a worker process)."""
    import torch

    from refinevla_core.eval.cli import RandomPolicy

    torch.set_num_threads(1)
    config = SimConfig(**sim)
    out: dict[str, Any] = {}
    makers = {"expert": ("scripted expert (reads the simulator state; not a learned policy)",
                         lambda backend: ScriptedExpertPolicy(backend.privileged_state)),
              "random": ("random actions (a floor)", lambda backend: RandomPolicy(seed))}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for name in names:
        label, make = makers[name]
        t0 = time.perf_counter()
        results = evaluate(make, [config.task], episodes, seed=seed, sim=config)
        rate = success_rate(sum(r.success for r in results), len(results))
        out[name] = {"label": label, "via": "in-process (eval.runner)", "successes": rate.successes,
                     "trials": rate.trials, "success_rate": rate.rate, "wilson95": [rate.low, rate.high],
                     "text": rate.text(), "mean_steps": float(np.mean([r.steps for r in results])),
                     "seconds": round(time.perf_counter() - t0, 2),
                     "episodes": [r.to_dict() for r in results]}
    (Path(out_dir) / "references.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


def eval_fingerprint_parts(model: ModelSettings, collect: CollectSettings, settings: EvalSettings) -> dict[str, Any]:
    s = dataclasses.asdict(settings)
    return {"sim": sim_settings(collect, settings), "episodes": s["episodes"], "seed": s["seed"],
            "mode": model.eval_rationale_mode, "every_n": s["rationale_every_n"]}


def reference_fingerprint_parts(collect: CollectSettings, settings: EvalSettings) -> dict[str, Any]:
    return {"sim": sim_settings(collect, settings), "seed": settings.seed, "episodes": settings.reference_episodes,
            "references": settings.references}


BASE_NAME = "pretrained_base"


def base_reference(train: Any, settings: EvalSettings) -> tuple[ModelSettings, str] | None:
    """The pretrained base of the demo's models as a policy to evaluate alone (action-only, through the same ROS
    lanes): what fine-tuning adds is measured against it. None without a base or with eval.base_reference off."""
    from refinevla_core.training.trainer import refinevla_checkpoint_folder

    if not settings.base_reference:
        return None
    data = yaml.safe_load(resolve_repo_path(train.base_config).read_text()) or {}
    folder = refinevla_checkpoint_folder((train.extra or {}).get("base_checkpoint", data.get("base_checkpoint")))
    if folder is None:
        return None
    model = ModelSettings(name=BASE_NAME, description="the pretrained base alone, no fine-tuning (reference)",
                          lambda_rationale=0.0, rationale_dropout=1.0, target_order="action_then_rationale",
                          eval_rationale_mode="action_only")
    return model, str(folder.resolve())


def checkpoint_fingerprint(folder: str | Path) -> str:
    """Identity of a checkpoint's weights for the stage cache (its manifest, else the weights' size and time)."""
    folder = Path(folder)
    manifest = folder / "refinevla_checkpoint.json"
    if manifest.is_file():
        return manifest.read_text()
    weights = folder / "model.safetensors"
    return f"{weights.stat().st_size}:{weights.stat().st_mtime_ns}" if weights.is_file() else str(folder)
