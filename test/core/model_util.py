"""Shared helpers for the model tests: the tiny preset built once per order, and a short real overfitting run."""

from __future__ import annotations

import copy
import functools

import numpy as np
import torch

from refinevla_core.data.stats import ActionStats, compute_stats
from refinevla_core.model.modeling_refinevla import RefineVLA, token_losses
from refinevla_core.model.presets import build_from_preset
from refinevla_core.rationale import Rationale

RATIONALE = Rationale("red cube", "open", "cube left", "push")
INSTRUCTION = "push the cube"
TARGET_ACTION = np.array([0.01, -0.02, 0.03, 0.0, 0.01, -0.01, 1.0], np.float32)


def example_stats() -> ActionStats:
    rng = np.random.default_rng(0)
    actions = rng.uniform(-0.05, 0.05, (200, 7))
    actions[:, 6] = rng.integers(0, 2, 200)
    return compute_stats(actions)


def example_image(seed: int = 0, shape: tuple[int, int] = (64, 80)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (*shape, 3), dtype=np.uint8)


@functools.lru_cache(maxsize=4)
def _tiny(order: str, max_rationale_tokens: int) -> RefineVLA:
    torch.set_num_threads(1)
    vla = build_from_preset("tiny", target_order=order, overrides={"max_rationale_tokens": max_rationale_tokens})
    vla.processor.set_action_stats(example_stats())
    return vla


def tiny_vla(order: str = "rationale_then_action", max_rationale_tokens: int = 24, fresh: bool = False) -> RefineVLA:
    """The random-init tiny preset with example statistics; `fresh=True` gives a private copy to modify."""
    vla = _tiny(order, max_rationale_tokens)
    return copy.deepcopy(vla) if fresh else vla


@functools.lru_cache(maxsize=2)
def overfit_tiny(order: str) -> RefineVLA:
    """Teach the tiny model one (image, instruction) -> (RATIONALE, TARGET_ACTION) pair with the real joint loss, until
    both losses are ~0 (about 100 AdamW steps, ~5 s on one core). Also shows it an action-only copy of the sample
    (rationale dropout), as the trainer does."""
    vla = tiny_vla(order, fresh=True)
    image = example_image()
    batch = vla.processor.training_batch([image, image], [INSTRUCTION] * 2, np.stack([TARGET_ACTION] * 2),
                                         [RATIONALE, None])
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(vla.parameters(), lr=1e-2)
    vla.train()
    for _ in range(200):
        losses = token_losses(vla(**batch).logits, batch)
        loss = losses["action"] + losses["rationale"] + losses["format"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if losses["action"].item() < 0.01 and losses["rationale"].item() < 0.01:
            break
    vla.eval()
    return vla
