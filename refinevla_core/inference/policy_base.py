"""What every checkpoint-backed policy shares: the loaded model and its PolicyConfig, the step count, loading a
checkpoint with the configured threads / dtype / verification, and never passing on a non-finite action.

Policy (PaliGemma family, inference/policy.py) and Pi0Policy (π0 action chunks, inference/policy_pi0.py) build on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from refinevla_core.config import ConfigError
from refinevla_core.inference.config import PolicyConfig
from refinevla_core.model.checkpoint import load_checkpoint
from refinevla_core.rationale import Rationale, RationaleError, parse_rationale


def parse_generated_rationale(text: str) -> Rationale | None:
    """The four-section Rationale of generated text, or None when it does not parse (the text is kept anyway)."""
    try:
        return parse_rationale(text)
    except RationaleError:
        return None


def loading_config(config: PolicyConfig | None) -> PolicyConfig:
    """The PolicyConfig to load with (default settings when None); applies its torch_threads first."""
    config = config or PolicyConfig()
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    return config


def finite_action(action: np.ndarray) -> np.ndarray:
    """The float32 action; a non-finite one cannot come out of bin centres or clipping, and is never passed on."""
    if not np.isfinite(action).all():
        raise RuntimeError(f"the decoded action {action} is not finite; refusing to return it")
    return action.astype(np.float32)


class CheckpointPolicy:
    """A loaded model (with action statistics) behind predict/reset; `what` names the model in error messages."""

    def __init__(self, model: Any, config: PolicyConfig | None = None, what: str = "the model") -> None:
        self.model = model
        self.config = config or PolicyConfig()
        if model.stats is None:
            raise ConfigError(f"{what} has no action statistics; load it from a checkpoint (stats.json)")
        self._step = 0

    @property
    def target_order(self) -> str:
        return self.model.refinevla_config.target_order

    @property
    def stats(self) -> Any:
        return self.model.stats

    @property
    def step(self) -> int:
        """Steps predicted since the last reset()."""
        return self._step

    @staticmethod
    def load_model(path: str | Path, device: str, config: PolicyConfig) -> Any:
        """The model of a checkpoint folder (either family), with the dtype and verification of `config`."""
        return load_checkpoint(path, device=device, dtype=config.dtype or None, verify=config.verify)
