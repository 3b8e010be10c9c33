"""One interface to every simulator, so the collector, the evaluator and the ROS bridge never care which one runs.

A backend speaks the project's action convention only (Bridge: dx, dy, dz m; droll, dpitch, dyaw rad; gripper 1 = open,
0 = closed) and converts to its simulator's own convention inside. `make_backend(SimConfig)` picks ManiSkill3 (always
available, CPU rendering) or SimplerEnv (when `simpler_env` and its assets are installed).

The interface (SimBackend, SimObservation, StepResult, the privileged-state contract) is sim/interface.py.
"""

from __future__ import annotations

from refinevla_core.sim import simpler
from refinevla_core.sim.config import SimConfig
from refinevla_core.sim.interface import (
    EpisodeInfo,
    SimBackend,
    SimError,
    SimObservation,
    StepResult,
    validate_action,
)
from refinevla_core.sim.maniskill import TASKS, ManiSkillBackend

__all__ = [  # the interface, importable from here as before
    "EpisodeInfo", "SimBackend", "SimError", "SimObservation", "StepResult", "known_tasks", "make_backend",
    "validate_action",
]


def make_backend(config: SimConfig) -> SimBackend:
    """The backend for `config` (ManiSkill3 unless the task is a SimplerEnv task or config.backend says simpler)."""
    kind = config.backend
    if kind == "auto":
        kind = "simpler" if simpler.is_simpler_task(config.task) else "maniskill"
    if kind == "simpler":
        return simpler.SimplerBackend(config)
    return ManiSkillBackend(config)


def known_tasks() -> dict[str, list[str]]:
    """Task names per backend."""
    return {"maniskill": sorted(TASKS), "simpler": sorted(simpler.SIMPLER_TASKS)}
