"""Simulator fixtures shared by test/sim: ManiSkill env creation costs 4-9 s, so each rendered env is made once per
session at 64 px and reused (episodes are independent of history: the backend rebuilds the scene at every reset)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from refinevla_core.sim.backend import SimBackend
from refinevla_core.sim.config import SimConfig

TEST_IMAGE_SIZE = 64


def _backend(**kwargs) -> SimBackend:
    pytest.importorskip("mani_skill", reason="ManiSkill3 is not installed (./setup.sh with WITH_SIM=1)")
    if not os.environ.get("VK_ICD_FILENAMES") and not os.path.exists("/usr/share/vulkan/icd.d"):
        pytest.skip("no Vulkan driver: source .venv/refinevla_env.sh (./setup.sh installs lavapipe)")
    import torch

    torch.set_num_threads(1)
    from refinevla_core.sim.maniskill import ManiSkillBackend

    return ManiSkillBackend(SimConfig(**kwargs))


@pytest.fixture(scope="session")
def push_cube() -> Iterator[SimBackend]:
    """PushCube-v1, 64x64 camera, default controller and instructions (the collector's defaults at 64 px)."""
    backend = _backend(task="PushCube-v1", image_size=TEST_IMAGE_SIZE)
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def state_only() -> Iterator[dict[str, SimBackend]]:
    """Physics-only envs (no camera; 0.3 s to make, 3 ms a step) for expert success rates over many seeds."""
    made: dict[str, SimBackend] = {}

    def get(task: str) -> SimBackend:
        if task not in made:
            made[task] = _backend(task=task, render=False)
        return made[task]

    yield get  # type: ignore[misc]
    for b in made.values():
        b.close()
