"""Action tokenizer: 7-D continuous actions <-> 7 discrete bins, the OpenVLA scheme the VLA predicts as tokens.

Why: a language model emits tokens, a robot needs metres and radians. Each dimension is mapped to [-1, 1] with its
dataset statistics, clipped, and cut into `n_bins` (256) uniform bins; a bin decodes to its centre. The round-trip
error inside the range is at most half a bin, (high - low) / (2 * n_bins) in the dimension's own units; values beyond
the range are clipped to its edge (q01/q99 by design: the 1% tails are outliers, not commands to reproduce).

Ranges per dimension (ACTION_NAMES order):
  - dx, dy, dz, droll, dpitch, dyaw: [q01, q99] of the training data (`ActionStats`), OpenVLA's BOUNDS_Q99;
  - gripper: the fixed Bridge range [0, 1] (1 = open, 0 = closed), not its quantiles: the gripper is a command, not a
    measurement, and a dataset where the gripper never closes must still be able to say "close".
A dimension that never varies in the data (q01 == q99, e.g. rotations in a translation-only task) gets a tiny range
around its value, so it decodes to that value instead of dividing by zero.

Gripper conventions (Bridge 1 = open / 0 = closed, SimplerEnv's -1..+1, ...) and their converters are
refinevla_core.gripper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from refinevla_core.data.episode import ACTION_DIM, ACTION_NAMES, DataError
from refinevla_core.data.stats import ActionStats

GRIPPER_INDEX = ACTION_NAMES.index("gripper")
BRIDGE_GRIPPER_BOUNDS = (0.0, 1.0)  # closed, open
MIN_HALF_RANGE = 1e-6  # a constant dimension is tokenized over [value - 1e-6, value + 1e-6]


@dataclass(frozen=True)
class ActionTokenizer:
    """Uniform bins between per-dimension `low` and `high` (float32[7] each)."""

    low: np.ndarray
    high: np.ndarray
    n_bins: int = 256

    def __post_init__(self) -> None:
        low = np.asarray(self.low, dtype=np.float64).reshape(-1)
        high = np.asarray(self.high, dtype=np.float64).reshape(-1)
        if low.shape != (ACTION_DIM,) or high.shape != (ACTION_DIM,):
            raise DataError(f"ActionTokenizer: low/high must have {ACTION_DIM} values; got {low.shape}, {high.shape}")
        if not (np.isfinite(low).all() and np.isfinite(high).all()):
            raise DataError("ActionTokenizer: low/high contain NaN/inf; recompute the action statistics")
        if np.any(low > high):
            dim = ACTION_NAMES[int(np.argmax(low > high))]
            raise DataError(f"ActionTokenizer: low > high for {dim}")
        if int(self.n_bins) < 2:
            raise DataError(f"ActionTokenizer: n_bins must be >= 2, got {self.n_bins}")
        centre = (low + high) / 2
        half = np.maximum((high - low) / 2, MIN_HALF_RANGE)
        object.__setattr__(self, "low", (centre - half).astype(np.float64))
        object.__setattr__(self, "high", (centre + half).astype(np.float64))
        object.__setattr__(self, "n_bins", int(self.n_bins))

    @classmethod
    def from_stats(cls, stats: ActionStats, n_bins: int = 256) -> ActionTokenizer:
        """q01/q99 for the six delta dimensions, the fixed Bridge range [0, 1] for the gripper."""
        low = stats.q01.astype(np.float64).copy()
        high = stats.q99.astype(np.float64).copy()
        low[GRIPPER_INDEX], high[GRIPPER_INDEX] = BRIDGE_GRIPPER_BOUNDS
        return cls(low=low, high=high, n_bins=n_bins)

    @property
    def bin_width(self) -> np.ndarray:
        """Width of one bin in each dimension's own units (metres, radians, gripper fraction)."""
        return ((self.high - self.low) / self.n_bins).astype(np.float32)

    # ---- continuous <-> [-1, 1] ----------------------------------------------------------------------------
    def _check(self, actions: Any) -> np.ndarray:
        a = np.asarray(actions, dtype=np.float64)
        if a.ndim == 0 or a.shape[-1] != ACTION_DIM:
            raise DataError(f"actions must have a last dimension of {ACTION_DIM} {ACTION_NAMES}; got {a.shape}")
        bad = ~np.isfinite(a)
        if bad.any():
            idx = tuple(int(v) for v in np.argwhere(bad)[0])
            raise DataError(
                f"action {idx[:-1] or ''} has a non-finite {ACTION_NAMES[idx[-1]]} ({a[idx]}); "
                "NaN/inf actions cannot be tokenized — fix or drop those frames"
            )
        return a

    def normalize(self, actions: Any) -> np.ndarray:
        """Map to [-1, 1] per dimension, clipping values outside [low, high]."""
        a = self._check(actions)
        return np.clip(2.0 * (a - self.low) / (self.high - self.low) - 1.0, -1.0, 1.0)

    def unnormalize(self, normalized: Any) -> np.ndarray:
        n = np.clip(np.asarray(normalized, dtype=np.float64), -1.0, 1.0)
        return ((n + 1.0) / 2.0 * (self.high - self.low) + self.low).astype(np.float32)

    # ---- continuous <-> bins --------------------------------------------------------------------------------
    def encode(self, actions: Any) -> np.ndarray:
        """Bin index (int64, 0..n_bins-1) of each dimension; shape (..., 7)."""
        n = self.normalize(actions)
        return np.clip(np.floor((n + 1.0) / 2.0 * self.n_bins), 0, self.n_bins - 1).astype(np.int64)

    def decode(self, bins: Any) -> np.ndarray:
        """Bin centres in each dimension's units (float32, shape (..., 7))."""
        b = np.asarray(bins)
        if b.ndim == 0 or b.shape[-1] != ACTION_DIM:
            raise DataError(f"bins must have a last dimension of {ACTION_DIM}; got {b.shape}")
        if not np.issubdtype(b.dtype, np.integer):
            raise DataError(f"bins must be integers, got {b.dtype}")
        if b.size and (b.min() < 0 or b.max() >= self.n_bins):
            raise DataError(f"bins must lie in 0..{self.n_bins - 1}; got {int(b.min())}..{int(b.max())}")
        centres = (b.astype(np.float64) + 0.5) / self.n_bins * 2.0 - 1.0
        return self.unnormalize(centres)

    # ---- serialisation (travels inside refinevla_config.json of every checkpoint) ---------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"n_bins": self.n_bins, "low": [float(v) for v in self.low], "high": [float(v) for v in self.high]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ActionTokenizer:
        try:
            return cls(low=np.asarray(data["low"]), high=np.asarray(data["high"]), n_bins=int(data["n_bins"]))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"action tokenizer settings are incomplete or malformed ({e!r})") from e
