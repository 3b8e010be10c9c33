"""`refinevla collect`: expert episodes land in the episode format with everything the later stages need; a
collection resumes where it stopped, does nothing when complete, and refuses to mix different arguments."""

from __future__ import annotations

import json

import numpy as np
import pytest

from refinevla_core.annotation.sim_teacher import SimTeacher
from refinevla_core.cli import main as refinevla
from refinevla_core.data.episode import DataError
from refinevla_core.data.episode_dataset import EpisodeDataset
from refinevla_core.sim.collect import CollectConfig, collect
from refinevla_core.sim.experts import expert_step
from refinevla_core.sim.instructions import instruction_for


@pytest.mark.sim
def test_collect_resume_and_refuse_mixing(tmp_path, push_cube, capsys):
    out = tmp_path / "push"
    cfg = CollectConfig(tasks=["PushCube-v1"], episodes=2, out=out, seed=40, image_size=64)
    first = collect(cfg, progress=False, backends={"PushCube-v1": push_cube})
    assert (first.added, first.total) == (2, 2)

    ds = EpisodeDataset(out)
    ep = ds.load_episode(1)
    assert ep.seed == 41 and ep.task == "PushCube-v1" and ep.success is True
    assert ep.instruction == instruction_for("PushCube-v1", 41)
    assert ep.images.shape[1:] == (64, 64, 3) and len(ep.states) == len(ep) == ep.images.shape[0]
    # labels are the expert's actions on the recorded states (Bridge convention, within the per-step limits)
    for t in (0, len(ep) - 1):
        assert np.allclose(ep.actions[t], expert_step(ep.states[t])[1], atol=1e-6)
    assert np.all(np.abs(ep.actions[:, :3]) <= 0.1) and set(np.unique(ep.actions[:, 6])) <= {0.0, 1.0}
    assert ep.states[-1]["phase"] in ("push", "done") and ep.metadata["expert"] == "scripted:v1"
    assert len(ep.metadata["executed_actions"]) == len(ep)
    SimTeacher().check_episode(ds.episode_info(1), "episode 1")  # the sim teacher can annotate it

    # resume: two more episodes, seeds continue; the first two are untouched
    before = (out / "episodes" / "000000.npz").read_bytes()
    cfg.episodes = 3
    assert collect(cfg, progress=False, backends={"PushCube-v1": push_cube}).added == 1
    assert EpisodeDataset(out).load_episode(2).seed == 42
    assert (out / "episodes" / "000000.npz").read_bytes() == before

    # complete: the CLI does nothing (and needs no simulator)
    args = ["collect", "--task", "PushCube-v1", "--episodes", "3", "--out", str(out), "--seed", "40",
            "--image-size", "64", "--no-progress"]
    assert refinevla(args) == 0
    assert "3 episodes (0 new" in capsys.readouterr().out

    # different arguments: refused, naming the difference and the fix; nothing written
    meta = (out / "meta.json").read_text()
    assert refinevla([*args[:-2], "96", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "image_size: dataset 64 vs now 96" in err and "another --out" in err
    assert (out / "meta.json").read_text() == meta
    assert json.loads(meta)["collect"]["seed"] == 40


def test_collect_arguments_are_checked_before_anything_is_written(tmp_path, capsys):
    assert refinevla(["collect", "--task", "OpenDoor-v1", "--episodes", "2", "--out", str(tmp_path / "x")]) == 2
    assert "no scripted expert for ['OpenDoor-v1']" in capsys.readouterr().err
    assert refinevla(["collect", "--episodes", "2", "--out", str(tmp_path / "y"), "--image-size", "4"]) == 2
    assert "image_size 4" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    (tmp_path / "z").mkdir()
    EpisodeDataset.create(tmp_path / "z")
    with pytest.raises(DataError, match="not written by `refinevla collect`"):
        collect(CollectConfig(out=tmp_path / "z", episodes=1), progress=False)
