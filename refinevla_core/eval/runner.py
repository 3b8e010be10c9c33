"""Closed-loop evaluation in-process: any object with `predict(image, instruction)` and `reset()` against a simulator
backend, episode by episode, with per-task Wilson intervals.

In-process is the fast path (no serialisation, no DDS). The ROS path (the ROS package's sim_eval_client) runs the same
policy through sim_bridge_node and produces the same EpisodeResult objects; for the same seeds the numbers are the
same (tested), because a backend episode depends only on (task, seed, actions).

Episode i of every task uses seed `seed + i`; success is "solved at any step" (`success`) and, as SimplerEnv counts
it, "solved at the last step" (`final_success`); the report shows the first.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from refinevla_core.eval.stats import Rate, success_rate
from refinevla_core.sim.backend import SimBackend, make_backend
from refinevla_core.sim.config import SimConfig


@dataclass
class EpisodeResult:
    task: str
    seed: int
    instruction: str
    success: bool  # solved at any step
    final_success: bool  # solved at the last step (SimplerEnv's criterion)
    steps: int
    total_reward: float
    wall_s: float
    policy_ms: list[float] = field(default_factory=list)
    actions: list[list[float]] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)  # rationale text per step ("" when none)
    frames: list[np.ndarray] | None = None  # the camera images seen (only when recorded for a video)
    via: str = "in-process"

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "seed": self.seed, "instruction": self.instruction, "success": self.success,
                "final_success": self.final_success, "steps": self.steps, "total_reward": round(self.total_reward, 4),
                "wall_s": round(self.wall_s, 3),
                "policy_ms_mean": round(float(np.mean(self.policy_ms)), 3) if self.policy_ms else None,
                "via": self.via}


@dataclass
class TaskSummary:
    task: str
    rate: Rate
    final_rate: Rate
    mean_steps: float
    mean_policy_ms: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "successes": self.rate.successes, "trials": self.rate.trials,
                "success_rate": self.rate.rate, "wilson95": [self.rate.low, self.rate.high],
                "final_success_rate": self.final_rate.rate, "mean_steps": self.mean_steps,
                "mean_policy_ms": self.mean_policy_ms}


def summarise(results: Iterable[EpisodeResult]) -> dict[str, TaskSummary]:
    by_task: dict[str, list[EpisodeResult]] = {}
    for r in results:
        by_task.setdefault(r.task, []).append(r)
    out = {}
    for task, rs in by_task.items():
        ms = [m for r in rs for m in r.policy_ms]
        out[task] = TaskSummary(
            task=task, rate=success_rate(sum(r.success for r in rs), len(rs)),
            final_rate=success_rate(sum(r.final_success for r in rs), len(rs)),
            mean_steps=float(np.mean([r.steps for r in rs])), mean_policy_ms=float(np.mean(ms)) if ms else None)
    return out


def caption(output: Any) -> str:
    text = getattr(output, "rationale_text", "") or ""
    if not text and getattr(output, "rationale", None) is not None:
        text = output.rationale.text()
    return text


def run_episode(policy: Any, backend: SimBackend, seed: int, record_frames: bool = False) -> EpisodeResult:
    """One closed-loop episode: reset(seed), then predict -> step until the backend says done."""
    t0 = time.perf_counter()
    obs = backend.reset(seed)
    policy.reset()
    frames: list[np.ndarray] = []
    result = EpisodeResult(task=backend.task, seed=seed, instruction=obs.instruction, success=False,
                           final_success=False, steps=0, total_reward=0.0, wall_s=0.0,
                           frames=frames if record_frames else None)
    success = False
    while True:
        if record_frames and obs.image is not None:
            frames.append(obs.image)
        tp = time.perf_counter()
        output = policy.predict(obs.image, obs.instruction)
        result.policy_ms.append((time.perf_counter() - tp) * 1000.0)
        action = np.asarray(getattr(output, "action", output), dtype=np.float64).reshape(-1)
        result.actions.append([round(float(v), 6) for v in action])
        result.captions.append(caption(output))
        step = backend.step(action)
        result.total_reward += step.reward
        success = step.success
        obs = step.obs
        if step.done:
            break
    if record_frames and obs.image is not None:
        frames.append(obs.image)  # the final observation
    result.steps = backend.episode.steps
    result.success = bool(backend.episode.ever_success)
    result.final_success = bool(success)
    result.wall_s = time.perf_counter() - t0
    return result


def evaluate(policy_for: Callable[[SimBackend], Any], tasks: list[str], episodes: int, *, seed: int = 0,
             sim: SimConfig | None = None, videos_per_task: int = 0,
             on_episode: Callable[[EpisodeResult], None] | None = None) -> list[EpisodeResult]:
    """Evaluate on every task; `policy_for(backend)` returns the policy (the scripted expert needs the backend's
    privileged state; a learned policy ignores the argument). The first `videos_per_task` episodes keep frames."""
    base = sim or SimConfig()
    results: list[EpisodeResult] = []
    for task in tasks:
        backend = make_backend(replace(base, task=task))
        try:
            policy = policy_for(backend)
            for i in range(episodes):
                r = run_episode(policy, backend, seed + i, record_frames=i < videos_per_task)
                results.append(r)
                if on_episode is not None:
                    on_episode(r)
        finally:
            backend.close()
    return results
