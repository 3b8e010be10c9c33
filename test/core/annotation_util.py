"""Tiny datasets for the annotation tests: real EpisodeDataset folders with 16x16 images and privileged states."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from refinevla_core.data import Episode, EpisodeDataset


def push_state(t: int, length: int, cube_x: float = 0.10) -> dict:
    """The privileged state contract for a PushCube-like scene: approach, then push, then done."""
    phase = "approach" if t < length // 3 else ("push" if t < length - 1 else "done")
    return {
        "task": "PushCube-v1",
        "phase": phase,
        "objects": {"cube": {"position": [cube_x + 0.01 * t, 0.02, 0.02], "orientation_wxyz": [1, 0, 0, 0],
                             "description": "red cube", "size_m": 0.04}},
        "target": {"name": "goal", "position": [0.30, 0.02, 0.0], "description": "red/white target disc"},
        "gripper": {"position": [0.0 + 0.01 * t, 0.0, 0.10 - 0.01 * min(t, 8)], "opening": 1.0, "holding": None},
    }


def make_episode(length: int, seed: int, instruction: str, *, states: bool = True, size: int = 16) -> Episode:
    rng = np.random.default_rng(seed)
    actions = rng.normal(0, 0.01, (length, 7)).astype(np.float32)
    actions[:, 6] = 1.0
    return Episode(
        images=rng.integers(0, 255, (length, size, size, 3), dtype=np.uint8),
        actions=actions, instruction=instruction, task="PushCube-v1", success=True, seed=seed,
        states=[push_state(t, length) for t in range(length)] if states else None,
    )


def make_dataset(root: Path, episodes: int = 2, frames: int = 6, *, states: bool = True, size: int = 16,
                 name: str = "") -> EpisodeDataset:
    """`episodes` episodes of `frames` frames; every image is random (unique), instruction names the episode."""
    ds = EpisodeDataset.create(root, name=name, fps=5.0)
    for e in range(episodes):
        ds.append(make_episode(frames, seed=100 + e, instruction=f"push the red cube to the target {e}",
                               states=states, size=size))
    return ds


def frame_of_digest(ds: EpisodeDataset) -> dict[str, tuple[int, int]]:
    """image digest (as the local chat server records it) -> (episode, frame)."""
    from refinevla_core.annotation.local_server import image_digest
    from refinevla_core.annotation.prompts import png_data_url

    out = {}
    for e in range(len(ds)):
        episode = ds.load_episode(e)
        for f, image in enumerate(episode.images):
            out[image_digest(png_data_url(image))] = (e, f)
    return out
