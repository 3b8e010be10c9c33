"""Simulator cost: what the ROS bridge adds to a raw ManiSkill step (goal <= 1.2x), env creation and step times.

Method: the scripted expert acts on an in-process simulator (timing only backend.step); each of its actions is then
sent through a sim_bridge_node process running the same seed, timing from publishing the action to receiving the
next image and EpisodeStatus (DDS both ways, message conversion, the step itself). Raw and bridged steps alternate
step by step, so both see the same machine load, and both simulators follow the same trajectory (checked); medians
are compared. The bridge runs as a learned policy would
use it: no privileged-state topic. Env creation/reset/step times are measured for several camera sizes.
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from refinevla_core.sim.config import SimConfig
from refinevla_core.sim.experts import expert_action
from refinevla_core.sim.maniskill import ManiSkillBackend


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default="PushCube-v1")
    parser.add_argument("--image-size", type=int, default=112, help="camera size of the bridge comparison")
    parser.add_argument("--episodes", type=int, default=10, help="episodes (each step: raw, then bridged)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 112, 224], help="sizes of the env table")
    parser.add_argument("--steps", type=int, default=30, help="steps per size in the env table")


def _env_row(task: str, size: int, steps: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    backend = ManiSkillBackend(SimConfig(task=task, image_size=size))
    make_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    backend.reset(0)
    reset_s = time.perf_counter() - t0
    times = []
    rng = np.random.default_rng(0)
    for _ in range(steps):
        if backend.episode.done:
            backend.reset(1)
        a = np.r_[rng.uniform(-0.03, 0.03, 3), 0, 0, 0, 1.0]
        t0 = time.perf_counter()
        backend.step(a)
        times.append((time.perf_counter() - t0) * 1000)
    backend.close()
    return _row(f"env {task} {size}px: make, reset (scene rebuild), random steps", times, make_s=make_s,
                reset_s=reset_s)


def _row(measure: str, times_ms: list[float], **extra: Any) -> dict[str, Any]:
    row = {"measure": measure, "make_s": None, "reset_s": None, "steps": len(times_ms),
           "median_ms": round(statistics.median(times_ms), 2),
           "p90_ms": round(float(np.percentile(times_ms, 90)), 2), "ratio_vs_raw": None}
    row.update({k: round(v, 3) if isinstance(v, float) else v for k, v in extra.items()})
    return row


def _bridged_steps(backend: Any, client: Any, episodes: int) -> tuple[list[float], list[float]]:
    """Raw and bridged step times (ms), alternating step by step with the same expert action on the same seed."""
    from refinevla_ros.conversions import stamp_to_ns

    raw_ms: list[float] = []
    bridge_ms: list[float] = []
    for i in range(episodes):
        seed = 100 + i
        backend.reset(seed)
        _, status = client.start_episode(seed)
        while not backend.episode.done:
            # the same expert action, first to the raw simulator, then through the bridge (same trajectory)
            a = expert_action(backend.privileged_state())
            t0 = time.perf_counter()
            backend.step(a)
            raw_ms.append((time.perf_counter() - t0) * 1000)
            ns = stamp_to_ns(status.header.stamp)
            t0 = time.perf_counter()
            client.send(ns, a)
            status = client.spin_until(lambda ns=ns, e=status.episode: client.next_status(e, ns), "the next status")
            new = stamp_to_ns(status.header.stamp)
            client.spin_until(lambda new=new: client.images.get(new), "the next image")
            bridge_ms.append((time.perf_counter() - t0) * 1000)
        if not status.done or status.step != backend.episode.steps:
            raise RuntimeError(f"seed {seed}: the bridge diverged from the raw simulator "
                               f"(step {status.step} vs {backend.episode.steps})")
        client.forget(status.episode)
    return raw_ms, bridge_ms


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from refinevla_ros.harness.graph import BridgeGraph

    sim = SimConfig(task=args.task, image_size=args.image_size)
    table = [_env_row(args.task, size, args.steps) for size in args.sizes]

    backend = ManiSkillBackend(sim)
    log_path = Path(tempfile.mkstemp(prefix="bench-sim-bridge-", suffix=".log")[1])
    try:
        with BridgeGraph(replace(sim), log_path, node_name="bench_sim", client={"timeout_s": 120}) as graph:
            graph.client.wait_ready()
            raw_ms, bridge_ms = _bridged_steps(backend, graph.client, args.episodes)
            alive = graph.processes["sim_bridge_node"].alive()
    finally:
        backend.close()
    return _result(args, table, raw_ms, bridge_ms, bridge_log=log_path.read_text(), alive=alive)


def _result(args: argparse.Namespace, table: list[dict[str, Any]], raw_ms: list[float], bridge_ms: list[float], *,
            bridge_log: str, alive: bool) -> dict[str, Any]:
    inside = re.search(r"median simulator step ([\d.]+) ms, publish included ([\d.]+) ms", bridge_log)
    raw, bridged = statistics.median(raw_ms), statistics.median(bridge_ms)
    ratio = bridged / raw
    table.append(_row(f"raw env step {args.task} {args.image_size}px (baseline)", raw_ms))
    table.append(_row("bridge step: action published -> next image + status received", bridge_ms,
                      ratio_vs_raw=ratio))
    if inside:
        table.append({**_row("inside the bridge: simulator step (median)", [float(inside.group(1))]), "steps": None,
                      "p90_ms": None})
        table.append({**_row("inside the bridge: step + observation built and published (median)",
                             [float(inside.group(2))]), "steps": None, "p90_ms": None})
    verdict = "meets" if ratio <= 1.2 else "misses"
    summary = (f"Bridge step / raw env step = {ratio:.3f} (median {bridged:.1f} ms vs {raw:.1f} ms, "
               f"{args.task} {args.image_size} px, {len(raw_ms)} steps each, alternating step by step); {verdict} the "
               f"<= 1.2x goal. The bridge step includes DDS both ways, rgb8 Image + CameraInfo + EpisodeStatus "
               f"messages and the simulator step.")
    return {"summary": summary, "table": table, "ratio_bridge_vs_raw": ratio, "goal": 1.2,
            "bridge_alive_after": alive, "raw_step_ms": raw, "bridge_step_ms": bridged}
