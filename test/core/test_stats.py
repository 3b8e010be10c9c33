"""Action statistics: computed once per dataset, stored next to it, validated when loaded back."""

from __future__ import annotations

import json

import numpy as np
import pytest

from refinevla_core.data import DataError, Episode, EpisodeDataset
from refinevla_core.data.stats import (
    ActionStats,
    compute_dataset_stats,
    compute_stats,
    load_dataset_stats,
)


def make_dataset(root, episodes: int = 2, t: int = 50, seed: int = 0) -> EpisodeDataset:
    ds = EpisodeDataset.create(root)
    rng = np.random.default_rng(seed)
    for _ in range(episodes):
        actions = rng.normal(0, 0.02, (t, 7)).astype(np.float32)
        actions[:, 6] = rng.integers(0, 2, t)
        ds.append(Episode(images=np.zeros((t, 8, 8, 3), np.uint8), actions=actions, instruction="push the cube"))
    return ds


def test_statistics_match_numpy():
    actions = np.random.default_rng(1).uniform(-1, 1, (1000, 7)).astype(np.float32)
    stats = compute_stats(actions)
    assert stats.num_frames == 1000
    np.testing.assert_allclose(stats.q01, np.quantile(actions, 0.01, axis=0), atol=1e-6)
    np.testing.assert_allclose(stats.q99, np.quantile(actions, 0.99, axis=0), atol=1e-6)
    np.testing.assert_allclose(stats.mean, actions.mean(0), atol=1e-6)
    np.testing.assert_allclose(stats.std, actions.std(0), atol=1e-6)
    assert (stats.min <= stats.q01).all() and (stats.q99 <= stats.max).all()


def test_computed_once_stored_with_the_dataset_and_reloaded(tmp_path):
    ds = make_dataset(tmp_path / "ds")
    stats = compute_dataset_stats(ds)
    path = tmp_path / "ds" / "stats.json"
    assert path.is_file() and stats.num_frames == 100
    assert load_dataset_stats(tmp_path / "ds").allclose(stats)
    # a second call reuses the stored file (its content, not a recomputation, is returned)
    data = json.loads(path.read_text())
    data["mean"][0] = 123.0
    path.write_text(json.dumps(data))
    assert compute_dataset_stats(ds).mean[0] == 123.0
    # appending episodes makes the stored statistics stale: loading says so, computing refreshes them
    make_more = EpisodeDataset(tmp_path / "ds")
    make_more.append(Episode(images=np.zeros((3, 8, 8, 3), np.uint8), actions=np.zeros((3, 7), np.float32),
                             instruction="push"))
    with pytest.raises(DataError, match=r"describes 100 frames but the dataset has 103.*recompute=True"):
        load_dataset_stats(tmp_path / "ds")
    assert compute_dataset_stats(tmp_path / "ds").num_frames == 103


def test_nan_actions_name_row_and_dimension():
    actions = np.zeros((10, 7), np.float32)
    actions[4, 2] = np.nan
    with pytest.raises(DataError, match="row 4 has a non-finite dz"):
        compute_stats(actions)


def test_missing_and_damaged_files_give_the_fix(tmp_path):
    ds = make_dataset(tmp_path / "ds", episodes=1, t=5)
    with pytest.raises(DataError, match=r"no stats.json; compute it once with"):
        load_dataset_stats(ds)
    (tmp_path / "ds" / "stats.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_dataset_stats(ds)
    good = compute_stats(np.zeros((5, 7))).to_dict()
    good["q99"] = [float("nan")] * 7
    (tmp_path / "ds" / "stats.json").write_text(json.dumps(good))
    with pytest.raises(DataError, match="q99 of dx is nan"):
        load_dataset_stats(ds)
    with pytest.raises(DataError, match="missing key"):
        ActionStats.from_dict({"q01": [0] * 7})
    with pytest.raises(DataError, match="must have 7 values"):
        ActionStats.from_dict({**compute_stats(np.zeros((5, 7))).to_dict(), "std": [1.0] * 6})


def test_empty_dataset_is_an_error(tmp_path):
    EpisodeDataset.create(tmp_path / "empty")
    with pytest.raises(DataError, match="no episodes"):
        compute_dataset_stats(tmp_path / "empty")
