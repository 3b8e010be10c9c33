"""Training data: the episode split, rationale dropout, and a batch order that resumes and shards exactly."""

from __future__ import annotations

import numpy as np
import pytest

from refinevla_core.data.episode import DataError
from refinevla_core.training.data import (
    EpisodeFrames,
    ResumableBatchSampler,
    split_episodes,
    validation_indices,
)
from test.core.training_support import make_dataset


def test_split_is_by_episode_seeded_and_never_empty():
    train, val = split_episodes(20, 0.1, seed=0)
    assert len(val) == 2 and len(train) == 18 and not set(train) & set(val)
    assert sorted(train + val) == list(range(20))
    assert split_episodes(20, 0.1, seed=0) == (train, val)
    assert split_episodes(20, 0.1, seed=1) != (train, val)
    assert split_episodes(2, 0.9, seed=0)[0], "at least one training episode remains"
    assert split_episodes(3, 0.01, seed=0)[1], "a non-zero fraction holds out at least one episode"
    assert split_episodes(1, 0.5, seed=0) == ([0], [])
    assert split_episodes(5, 0.0, seed=0) == ([0, 1, 2, 3, 4], [])
    with pytest.raises(DataError, match="no episodes"):
        split_episodes(0, 0.1, seed=0)


def test_batch_order_is_a_pure_function_of_the_batch_number():
    full = list(ResumableBatchSampler(10, 3, seed=4, total_batches=9))
    assert len(full) == 9 and all(len(b) == 3 for b in full)
    epochs = [k[1] for b in full for k in b]
    assert epochs == sorted(epochs) and set(epochs) == {0, 1, 2}  # 3 batches per epoch (last partial one dropped)
    for epoch in range(3):
        frames = [k[0] for b in full[3 * epoch : 3 * epoch + 3] for k in b]
        assert len(set(frames)) == 9, "no frame twice within an epoch"
    resumed = list(ResumableBatchSampler(10, 3, seed=4, total_batches=9, start_batch=5))
    assert resumed == full[5:]
    assert len(ResumableBatchSampler(10, 3, seed=4, total_batches=9, start_batch=5)) == 4
    assert list(ResumableBatchSampler(10, 3, seed=5, total_batches=9)) != full


def test_shards_partition_the_global_order():
    full = list(ResumableBatchSampler(12, 2, seed=0, total_batches=12))
    shards = [list(ResumableBatchSampler(12, 2, seed=0, total_batches=12, start_batch=4, num_shards=2, shard=s))
              for s in range(2)]
    assert shards[0] == full[4::2] and shards[1] == full[5::2]
    assert [len(ResumableBatchSampler(12, 2, seed=0, total_batches=12, start_batch=4, num_shards=2, shard=s))
            for s in range(2)] == [4, 4]


def test_fewer_frames_than_a_batch_is_a_clear_error():
    with pytest.raises(DataError, match="fewer than batch_size=8"):
        ResumableBatchSampler(5, 8, seed=0, total_batches=1)


def test_frames_carry_their_rationale_and_dropout_is_deterministic(tmp_path):
    ds = make_dataset(tmp_path / "ds", episodes=3, length=5, stats=False)
    frames = EpisodeFrames(ds, [0, 2], seed=0, rationale_dropout=0.5, cache_mb=0)
    assert len(frames) == 10 and frames.num_with_rationale == 10
    sample = frames[(6, 0)]
    assert (sample.episode, sample.frame) == (2, 1)
    np.testing.assert_array_equal(sample.image, ds.load_episode(2).images[1])
    np.testing.assert_array_equal(sample.action, ds.load_episode(2).actions[1])
    dropped = [[frames[(i, epoch)].rationale is None for i in range(len(frames))] for epoch in range(40)]
    share = np.mean(dropped)
    assert 0.35 < share < 0.65
    assert dropped == [[frames[(i, epoch)].rationale is None for i in range(len(frames))] for epoch in range(40)]
    assert dropped[0] != dropped[1], "a frame is not dropped in the same epochs as every other"
    assert all(frames[i].rationale is not None for i in range(len(frames))), "no dropout outside training keys"
    assert EpisodeFrames(ds, [0], rationale_dropout=0.0)[(0, 3)].rationale is not None
    assert EpisodeFrames(ds, [0], rationale_dropout=1.0)[(0, 3)].rationale_dropped


def test_frames_without_rationales(tmp_path):
    ds = make_dataset(tmp_path / "ds", episodes=2, length=3, rationales=False, stats=False)
    frames = EpisodeFrames(ds, [0, 1], rationale_dropout=0.5)
    assert frames.num_with_rationale == 0
    assert frames[(0, 0)].rationale is None and not frames[(0, 0)].rationale_dropped


def test_validation_frames_are_spread_over_the_split():
    assert validation_indices(5, 10) == [0, 1, 2, 3, 4]
    picked = validation_indices(1000, 10)
    assert len(picked) == 10 and picked[0] == 0 and picked[-1] == 999


def test_statistics_come_from_the_training_split_only(tmp_path):
    """A held-out episode with extreme actions must not widen the action bins it is scored against."""
    from refinevla_core.data.episode import Episode
    from refinevla_core.data.episode_dataset import EpisodeDataset
    from refinevla_core.training.data import training_split_stats

    ds = EpisodeDataset.create(tmp_path / "ds", name="ds", fps=5.0)
    rng = np.random.default_rng(0)
    for scale in (0.01, 0.01, 0.01, 1.0):
        actions = (rng.normal(0, scale, (5, 7))).astype(np.float32)
        actions[:, 6] = 1.0
        ds.append(Episode(images=np.zeros((5, 8, 8, 3), np.uint8), actions=actions, instruction="push"))
    stats = training_split_stats(ds, [0, 1, 2])
    assert stats.num_frames == 15 and float(np.abs(stats.q99[:6]).max()) < 0.05
    assert float(np.abs(training_split_stats(ds, [0, 1, 2, 3]).q99[:6]).max()) > 0.5
