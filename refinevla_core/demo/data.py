"""The demo's data stages: scripted-expert episodes collected in parallel simulator processes and merged into one
dataset (with its action statistics), then annotated by the simulator-privileged teacher.

Collection uses `refinevla collect` itself, one process per shard: shard k collects seeds [seed + start_k, ...) into
its own dataset, so the merged dataset holds exactly the episodes a single `refinevla collect --seed <seed>` would
(episode i <-> seed + i, same noise draw per seed), in about 1/workers of the time. Each shard resumes by itself when
killed; the merge appends the shards' episodes in seed order and resumes after the last one it wrote.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from refinevla_core.data.episode import DataError
from refinevla_core.data.episode_dataset import EpisodeDataset
from refinevla_core.data.stats import compute_dataset_stats
from refinevla_core.demo.cache import advance_bar
from refinevla_core.demo.config import CollectSettings
from refinevla_core.sim.collect import EXPERT_VERSION

POLL_S = 1.0


def shard_plan(settings: CollectSettings) -> list[tuple[int, int]]:
    """(first seed, episodes) per shard; the first shards take the remainder."""
    workers = min(settings.workers, settings.episodes)
    base, extra = divmod(settings.episodes, workers)
    plan, start = [], settings.seed
    for k in range(workers):
        n = base + (1 if k < extra else 0)
        plan.append((start, n))
        start += n
    return plan


def _collect_command(settings: CollectSettings, seed: int, episodes: int, out: Path) -> list[str]:
    return [sys.executable, "-m", "refinevla_core", "collect", "--task", settings.task, "--episodes", str(episodes),
            "--out", str(out), "--seed", str(seed), "--image-size", str(settings.image_size),
            "--instruction-mode", settings.instruction_mode, "--noise-fraction", str(settings.noise_fraction),
            "--noise-std-m", str(settings.noise_std_m), "--no-progress"]


def _episodes_in(root: Path) -> int:
    try:
        return len(EpisodeDataset(root))
    except DataError:
        return 0


def child_env() -> dict[str, str]:
    """Environment of the demo's worker processes: one BLAS/torch thread each (they run side by side)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def collect_dataset(settings: CollectSettings, data_dir: Path, work_dir: Path, progress: bool = True
                    ) -> dict[str, Any]:
    """Collect `settings.episodes` episodes into `data_dir` (resumable), compute its statistics, return a summary."""
    from tqdm import tqdm


    started = time.perf_counter()
    plan = shard_plan(settings)
    shards = [work_dir / f"shard_{k}" for k in range(len(plan))]
    work_dir.mkdir(parents=True, exist_ok=True)
    have_merged = _episodes_in(data_dir)
    procs: list[tuple[subprocess.Popen, Path, Any]] = []
    bar = tqdm(total=settings.episodes, desc="collect", unit="ep", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    try:
        for (seed, n), shard in zip(plan, shards, strict=True):
            done_before = _shard_done_in_merge(plan, shards.index(shard), have_merged)
            if done_before >= n:
                continue  # this shard is merged already
            log = (work_dir / f"{shard.name}.log").open("ab")
            procs.append((subprocess.Popen(_collect_command(settings, seed, n, shard), stdout=log,
                                           stderr=subprocess.STDOUT, env=child_env()), shard, log))
        while True:
            count = sum(max(_episodes_in(s), _shard_done_in_merge(plan, k, have_merged))
                        for k, s in enumerate(shards))
            advance_bar(bar, min(count, settings.episodes))
            if all(p.poll() is not None for p, _, _ in procs):
                break
            time.sleep(POLL_S)
        for p, shard, log in procs:
            log.close()
            if p.returncode != 0:
                tail = (work_dir / f"{shard.name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"collecting {shard.name} failed (exit {p.returncode}):\n{tail}")
    finally:
        for p, _, log in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(30)
            log.close()
        bar.close()
    merged = _merge(plan, shards, data_dir, settings)
    stats = compute_dataset_stats(merged, recompute=True)
    shutil.rmtree(work_dir, ignore_errors=True)  # the merged dataset is the stage's output
    successes = sum(bool(merged.episode_info(i).get("success")) for i in range(len(merged)))
    return {"episodes": len(merged), "frames": merged.num_frames, "expert_successes": successes,
            "stats_frames": stats.num_frames, "shards": len(plan), "seconds": round(time.perf_counter() - started, 2),
            "seeds": [settings.seed, settings.seed + settings.episodes - 1]}


def _shard_done_in_merge(plan: list[tuple[int, int]], k: int, merged: int) -> int:
    """Episodes of shard k already in the merged dataset (the merge writes shards in order)."""
    before = sum(n for _, n in plan[:k])
    return max(0, min(plan[k][1], merged - before))


def _merge(plan: list[tuple[int, int]], shards: list[Path], data_dir: Path, settings: CollectSettings
           ) -> EpisodeDataset:
    identity = {"task": settings.task, "seed": settings.seed, "episodes": settings.episodes,
                "image_size": settings.image_size, "instruction_mode": settings.instruction_mode,
                "noise_fraction": settings.noise_fraction, "noise_std_m": settings.noise_std_m}
    if (data_dir / "meta.json").exists():
        merged = EpisodeDataset(data_dir)
        if merged.meta.get("demo_collect") != identity:
            raise DataError(f"{data_dir} holds another collection ({merged.meta.get('demo_collect')}); remove it")
    else:
        merged = EpisodeDataset.create(data_dir, name="demo", fps=20.0, demo_collect=identity,
                                       source="refinevla demo (refinevla collect shards)")
    for k, shard in enumerate(shards):
        first = sum(n for _, n in plan[:k])
        have = _shard_done_in_merge(plan, k, len(merged))
        if have >= plan[k][1]:
            continue
        source = EpisodeDataset(shard)
        for i in range(have, plan[k][1]):
            episode = source.load_episode(i)
            if episode.seed != plan[k][0] + i:
                raise DataError(f"{shard} episode {i} has seed {episode.seed}, expected {plan[k][0] + i}")
            index = merged.append(episode)
            if index != first + i:
                raise DataError(f"{data_dir}: shard {k} episode {i} landed at index {index}, not {first + i}; "
                                "remove the folder and rerun")
    return merged


def annotate_with_sim_teacher(data_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Every frame annotated by the simulator-privileged teacher, exported into <data>/rationales.jsonl."""
    from refinevla_core.annotation import AnnotationConfig, SimTeacher, annotate_dataset

    config = AnnotationConfig(teacher="sim")
    teacher = SimTeacher(future_actions=config.future_actions)
    summary = annotate_dataset(data_dir, teacher, config, progress=progress,
                               log=lambda message: print(f"    {message}", file=sys.stderr))
    if summary.any_failed:
        raise RuntimeError(f"the sim teacher failed on {summary.failed + summary.failed_skipped} frame(s): "
                           f"{summary.failures}")
    return {"teacher": teacher.name, "frames": summary.frames, "annotated": summary.done + summary.cached,
            "frames_with_rationale": summary.frames_with_rationale, "seconds": round(summary.elapsed_s, 2)}


def annotate_fingerprint_parts() -> dict[str, Any]:
    from refinevla_core.annotation.sim_teacher import SIM_TEACHER_VERSION

    return {"teacher": "sim", "version": SIM_TEACHER_VERSION}


def collect_fingerprint_parts() -> dict[str, Any]:
    return {"expert_version": EXPERT_VERSION}
