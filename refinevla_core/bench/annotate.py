"""Annotation throughput: concurrent vs serial teacher requests against a local server with API-like latency.

A paid teacher API spends most of each request waiting on the model, so throughput comes from requests in flight.
This runs the real OpenAI-compatible teacher and runner over a generated dataset twice against a local
chat-completions server (refinevla_core.annotation.local_server, in its own process like a real API) that answers
after a fixed latency: once serially
(concurrency 1, the baseline) and once with N requests in flight; the speed-up is their wall-time ratio in the same
run (goal >= 6x for 8 in flight). A third, cached rerun must make zero teacher calls.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from refinevla_core.data import Episode, EpisodeDataset

GOAL_SPEEDUP = 6.0
FRAMES_PER_EPISODE = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frames", type=int, default=48, help="frames annotated per mode (default 48)")
    parser.add_argument("--latency-ms", type=float, default=200.0, help="server latency per request (default 200)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight in the concurrent mode")
    parser.add_argument("--image-size", type=int, default=224, help="camera image side in pixels (default 224)")


def _dataset(root: Path, frames: int, image_size: int) -> None:
    rng = np.random.default_rng(0)
    ds = EpisodeDataset.create(root, name="bench-annotate")
    for e, start in enumerate(range(0, frames, FRAMES_PER_EPISODE)):
        t = min(FRAMES_PER_EPISODE, frames - start)
        actions = rng.normal(0, 0.01, (t, 7)).astype(np.float32)
        actions[:, 6] = 1.0
        ds.append(Episode(images=rng.integers(0, 255, (t, image_size, image_size, 3), dtype=np.uint8),
                          actions=actions, instruction=f"put the spoon in the cup {e}"))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from refinevla_core.annotation import AnnotationConfig, OpenAICompatTeacher, annotate_dataset
    from refinevla_core.annotation.local_server import ChatServerProcess

    rows = []
    with tempfile.TemporaryDirectory(prefix="refinevla-bench-annotate-") as tmp, \
            ChatServerProcess(latency_s=args.latency_ms / 1000.0) as server:
        root = Path(tmp) / "ds"
        _dataset(root, args.frames, args.image_size)

        def timed(mode: str, concurrency: int, store: str) -> dict[str, Any]:
            config = AnnotationConfig(teacher="openai", model="stand-in", base_url=server.base_url,
                                      api_key_env="", concurrency=concurrency)
            teacher = OpenAICompatTeacher(config)
            before = server.stats()
            start = time.perf_counter()
            try:
                summary = annotate_dataset(root, teacher, config, store_path=Path(tmp) / store, progress=False,
                                           export=False)
            finally:
                teacher.close()
            seconds = time.perf_counter() - start
            if summary.done + summary.cached != args.frames:
                raise RuntimeError(f"{mode}: only {summary.done + summary.cached}/{args.frames} frames done")
            after = server.stats()
            return {"mode": mode, "concurrency": concurrency, "frames": args.frames,
                    "teacher_calls": after["calls"] - before["calls"], "seconds": seconds,
                    "frames_per_s": args.frames / seconds}

        serial = timed("serial (baseline)", 1, "serial.sqlite")
        serial["server_max_in_flight"] = server.stats()["max_in_flight"]
        concurrent = timed(f"{args.concurrency} in flight", args.concurrency, "concurrent.sqlite")
        concurrent["server_max_in_flight"] = server.stats()["max_in_flight"]
        cached = timed("cached rerun", args.concurrency, "concurrent.sqlite")
        rows = [serial, concurrent, cached]
    speedup = serial["seconds"] / concurrent["seconds"]
    for row in rows:
        row["speedup_vs_serial"] = serial["seconds"] / row["seconds"]
        row.setdefault("server_max_in_flight", "-")
    verdict = "meets" if speedup >= GOAL_SPEEDUP else "misses"
    summary = (
        f"{args.concurrency} requests in flight annotate {speedup:.2f}x faster than serial ({verdict} the goal of "
        f">= {GOAL_SPEEDUP:.0f}x) against a local chat-completions server answering after {args.latency_ms:.0f} ms, "
        f"{args.frames} frames of {args.image_size}x{args.image_size} px per mode; the cached rerun made "
        f"{cached['teacher_calls']} teacher calls."
    )
    return {"summary": summary, "table": rows, "speedup": speedup, "goal_speedup": GOAL_SPEEDUP,
            "cached_rerun_calls": cached["teacher_calls"], "latency_ms": args.latency_ms, "frames": args.frames}
