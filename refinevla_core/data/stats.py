"""Action normalisation statistics: computed once per dataset, stored with it, and copied into every checkpoint.

Why a module of their own: the most common VLA deployment bug is un-normalising with the wrong statistics (OpenVLA's
"unnorm_key" guessing). Here the statistics are one validated object, written to `<dataset>/stats.json` next to the
episodes and to `<checkpoint>/stats.json` by `save_checkpoint`, so inference never has to guess them.

Per action dimension (ACTION_NAMES order): q01, q99 (1st/99th percentiles: the OpenVLA tokenizer range), mean, std,
min, max, plus the frame count they came from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from refinevla_core.data.episode import ACTION_DIM, ACTION_NAMES, DataError
from refinevla_core.data.episode_dataset import EpisodeDataset
from refinevla_core.io import atomic_write_json

STATS_FILENAME = "stats.json"
STATS_FORMAT = "refinevla-action-stats"
STAT_KEYS = ("q01", "q99", "mean", "std", "min", "max")


@dataclass(frozen=True)
class ActionStats:
    """Per-dimension statistics of 7-D Bridge-convention actions (each field float32[7])."""

    q01: np.ndarray
    q99: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    min: np.ndarray
    max: np.ndarray
    num_frames: int

    def __post_init__(self) -> None:
        for key in STAT_KEYS:
            value = np.asarray(getattr(self, key), dtype=np.float32)
            if value.shape != (ACTION_DIM,):
                raise DataError(
                    f"action statistics: {key} must have {ACTION_DIM} values ({', '.join(ACTION_NAMES)}); "
                    f"got shape {value.shape}"
                )
            bad = ~np.isfinite(value)
            if bad.any():
                dim = ACTION_NAMES[int(np.argmax(bad))]
                raise DataError(
                    f"action statistics: {key} of {dim} is {value[bad][0]}; recompute the statistics from data "
                    "without NaN/inf actions (compute_stats names the offending frame)"
                )
            object.__setattr__(self, key, value)
        if np.any(self.q01 > self.q99):
            dim = ACTION_NAMES[int(np.argmax(self.q01 > self.q99))]
            raise DataError(f"action statistics: q01 > q99 for {dim}; the statistics are damaged, recompute them")
        if np.any(self.std < 0):
            raise DataError("action statistics: a standard deviation is negative; recompute the statistics")
        if int(self.num_frames) < 1:
            raise DataError(f"action statistics: num_frames must be >= 1, got {self.num_frames}")

    # ---- serialisation --------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": STATS_FORMAT,
            "action_names": list(ACTION_NAMES),
            "num_frames": int(self.num_frames),
            **{key: [float(v) for v in getattr(self, key)] for key in STAT_KEYS},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "action statistics") -> ActionStats:
        if not isinstance(data, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if data.get("format", STATS_FORMAT) != STATS_FORMAT:
            raise DataError(f"{where}: format {data.get('format')!r} is not {STATS_FORMAT!r}")
        names = data.get("action_names", list(ACTION_NAMES))
        if list(names) != list(ACTION_NAMES):
            raise DataError(
                f"{where}: action_names {names} differ from {list(ACTION_NAMES)}; convert the actions first"
            )
        missing = [k for k in (*STAT_KEYS, "num_frames") if k not in data]
        if missing:
            raise DataError(f"{where}: missing key(s) {missing}; recompute with compute_dataset_stats()")
        try:
            values = {key: np.asarray(data[key], dtype=np.float32) for key in STAT_KEYS}
        except (TypeError, ValueError) as e:
            raise DataError(f"{where}: a statistic is not a list of numbers ({e})") from e
        try:
            return cls(num_frames=int(data["num_frames"]), **values)
        except DataError as e:
            raise DataError(f"{where}: {str(e).removeprefix('action statistics: ')}") from None

    def save(self, path: str | Path) -> Path:
        """Write atomically (a killed writer leaves the previous file intact)."""
        path = Path(path)
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | Path) -> ActionStats:
        path = Path(path)
        if not path.is_file():
            raise DataError(
                f"{path} does not exist: no action statistics were stored there; compute them with "
                "refinevla_core.data.stats.compute_dataset_stats(<dataset>)"
            )
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path} is not valid JSON ({e}); the statistics file is damaged, recompute it") from e
        return cls.from_dict(data, where=str(path))

    # ---- helpers --------------------------------------------------------------------------------------------
    @classmethod
    def identity(cls) -> ActionStats:
        """Statistics that map [-1, 1] to itself on the six delta dims (and [0, 1] gripper): for random-init
        models in benchmarks and tests where no dataset exists. Never use them for a trained policy."""
        q01 = np.array([-1.0] * 6 + [0.0], np.float32)
        q99 = np.ones(ACTION_DIM, np.float32)
        return cls(q01=q01, q99=q99, mean=np.zeros(ACTION_DIM), std=np.ones(ACTION_DIM), min=q01, max=q99,
                   num_frames=1)

    def allclose(self, other: ActionStats, atol: float = 0.0) -> bool:
        return self.num_frames == other.num_frames and all(
            np.allclose(getattr(self, k), getattr(other, k), rtol=0.0, atol=atol) for k in STAT_KEYS
        )


def compute_stats(actions: np.ndarray) -> ActionStats:
    """Statistics of an (N, 7) action array. NaN/inf raise DataError naming the first bad row and dimension."""
    actions = np.asarray(actions)
    if actions.ndim != 2 or actions.shape[1] != ACTION_DIM:
        raise DataError(f"actions must be (N, {ACTION_DIM}) {ACTION_NAMES}; got shape {actions.shape}")
    if actions.shape[0] == 0:
        raise DataError("no actions to compute statistics from (the dataset is empty)")
    bad = ~np.isfinite(actions)
    if bad.any():
        row, dim = (int(v) for v in np.argwhere(bad)[0])
        raise DataError(
            f"action row {row} has a non-finite {ACTION_NAMES[dim]} ({actions[row, dim]}); "
            f"{int(bad.any(axis=1).sum())} row(s) affected — fix or drop those frames before computing statistics"
        )
    a = actions.astype(np.float64)
    return ActionStats(
        q01=np.quantile(a, 0.01, axis=0), q99=np.quantile(a, 0.99, axis=0),
        mean=a.mean(axis=0), std=a.std(axis=0), min=a.min(axis=0), max=a.max(axis=0),
        num_frames=int(a.shape[0]),
    )


def share_outside_range(actions: np.ndarray, stats: ActionStats, tolerance: float = 1e-6) -> float:
    """Share of action values outside [q01, q99] of `stats`: what bins fitted on other data would clip."""
    a = np.asarray(actions, dtype=np.float64)
    outside = (a < stats.q01[None, :] - tolerance) | (a > stats.q99[None, :] + tolerance)
    return float(outside.mean()) if a.size else 0.0


def _open(dataset: EpisodeDataset | str | Path) -> EpisodeDataset:
    return dataset if isinstance(dataset, EpisodeDataset) else EpisodeDataset(dataset)


def compute_dataset_stats(dataset: EpisodeDataset | str | Path, recompute: bool = False) -> ActionStats:
    """The dataset's statistics, computed once and stored as `<dataset>/stats.json`.

    Stored statistics are reused while their frame count matches the dataset; after episodes were appended (or with
    `recompute=True`) they are computed again from every action and rewritten.
    """
    ds = _open(dataset)
    path = ds.root / STATS_FILENAME
    if path.is_file() and not recompute:
        stored = ActionStats.load(path)
        if stored.num_frames == ds.num_frames:
            return stored
    stats = compute_stats(ds.all_actions())
    stats.save(path)
    return stats


def load_dataset_stats(dataset: EpisodeDataset | str | Path) -> ActionStats:
    """The stored statistics of a dataset; DataError (naming the fix) when they are missing or stale."""
    ds = _open(dataset)
    path = ds.root / STATS_FILENAME
    if not path.is_file():
        raise DataError(
            f"{ds.root} has no {STATS_FILENAME}; compute it once with "
            f"refinevla_core.data.stats.compute_dataset_stats('{ds.root}')"
        )
    stats = ActionStats.load(path)
    if stats.num_frames != ds.num_frames:
        raise DataError(
            f"{path} describes {stats.num_frames} frames but the dataset has {ds.num_frames}; episodes were added "
            f"since, recompute with compute_dataset_stats('{ds.root}', recompute=True)"
        )
    return stats
