"""The project's own episode format: round trip, atomic commits, clear errors on damaged data."""

from __future__ import annotations

import numpy as np
import pytest

from refinevla_core.data import DataError, Episode, EpisodeDataset
from refinevla_core.rationale import Rationale

R = Rationale("a red cube", "approaching", "gripper above cube", "move down, close gripper")


def make_episode(t: int = 4, seed: int = 0) -> Episode:
    rng = np.random.default_rng(seed)
    return Episode(
        images=rng.integers(0, 255, (t, 16, 16, 3), dtype=np.uint8),
        actions=rng.normal(0, 0.01, (t, 7)).astype(np.float32),
        instruction="push the cube to the target",
        task="PushCube-v1", success=True, seed=seed,
        states=[{"cube": [0.1, 0.0, 0.02], "phase": "approach"} for _ in range(t)],
    )


def test_round_trip_with_rationales(tmp_path):
    ds = EpisodeDataset.create(tmp_path / "ds", fps=20)
    ep = make_episode()
    ep.rationales = [R, None, None, R]
    assert ds.append(ep) == 0
    assert ds.append(make_episode(3, seed=1)) == 1
    again = EpisodeDataset(tmp_path / "ds")
    assert len(again) == 2 and again.num_frames == 7
    back = again.load_episode(0)
    np.testing.assert_array_equal(back.images, ep.images)
    np.testing.assert_array_equal(back.actions, ep.actions)
    assert back.states[0]["phase"] == "approach" and back.rationales == [R, None, None, R]
    assert again.load_episode(1).rationales is None
    frames = list(again.iter_frames())
    assert len(frames) == 7 and frames[3].rationale == R and frames[4].episode_index == 1
    assert again.all_actions().shape == (7, 7)


def test_nan_action_is_rejected_before_writing(tmp_path):
    ds = EpisodeDataset.create(tmp_path / "ds")
    ep = make_episode()
    ep.actions[2, 1] = np.nan
    with pytest.raises(DataError, match="frame 2 has a non-finite dy"):
        ds.append(ep)
    assert len(EpisodeDataset(tmp_path / "ds")) == 0
    assert not list((tmp_path / "ds" / "episodes").iterdir())


@pytest.mark.parametrize("mutate, match", [
    (lambda e: setattr(e, "images", e.images[..., :2]), "uint8 RGB"),
    (lambda e: setattr(e, "actions", e.actions[:, :6]), r"\(T, 7\)"),
    (lambda e: setattr(e, "instruction", "  "), "instruction is empty"),
    (lambda e: setattr(e, "states", e.states[:1]), "states"),
])
def test_malformed_episodes(tmp_path, mutate, match):
    ep = make_episode()
    mutate(ep)
    with pytest.raises(DataError, match=match):
        EpisodeDataset.create(tmp_path / "ds").append(ep)


def test_damaged_files_give_clear_errors(tmp_path):
    with pytest.raises(DataError, match="not a refinevla dataset"):
        EpisodeDataset(tmp_path)
    ds = EpisodeDataset.create(tmp_path / "ds")
    ds.append(make_episode())
    npz = tmp_path / "ds" / "episodes" / "000000.npz"
    npz.write_bytes(npz.read_bytes()[:100])
    with pytest.raises(DataError, match="damaged"):
        ds.load_episode(0)
    with pytest.raises(DataError, match="already holds a dataset"):
        EpisodeDataset.create(tmp_path / "ds")


def test_torn_last_rationale_line_is_ignored(tmp_path):
    ds = EpisodeDataset.create(tmp_path / "ds")
    ds.append(make_episode())
    ds.add_rationales([(0, 1, R, "sim")])
    with (tmp_path / "ds" / "rationales.jsonl").open("a") as f:
        f.write('{"episode": 0, "frame": 2, "rationa')
    assert EpisodeDataset(tmp_path / "ds").rationales() == {(0, 1): R}


def test_append_after_a_torn_line_keeps_every_row_readable(tmp_path):
    ds = EpisodeDataset.create(tmp_path / "ds")
    ds.append(make_episode())
    ds.add_rationales([(0, 1, R, "sim")])
    with (tmp_path / "ds" / "rationales.jsonl").open("a") as f:
        f.write('{"episode": 0, "frame": 2, "rationa')
    ds.add_rationales([(0, 3, R, "sim")])
    assert EpisodeDataset(tmp_path / "ds").rationales() == {(0, 1): R, (0, 3): R}
