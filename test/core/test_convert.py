"""`refinevla convert`: real bags and LeRobot datasets in, an EpisodeDataset (with action statistics) out; atomic,
idempotent, and loud about anything it cannot convert."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from refinevla_core.data import convert
from refinevla_core.data.bag_topics import BagTopicsConfig
from refinevla_core.data.episode_dataset import EpisodeDataset
from refinevla_core.data.lerobot import LeRobotConfig
from refinevla_core.data.source import EpisodeSource
from refinevla_core.data.stats import load_dataset_stats
from test.core.bagutil import delta, demo_timeline, frame_rgb, image, write_bag
from test.core.lerobot_writer import write_lerobot_dataset
from test.core.test_lerobot import make_episodes

ROOT = Path(__file__).resolve().parents[2]


def run_convert(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    convert.add_arguments(parser)
    return convert.run(parser.parse_args([*argv, "--no-progress"]))


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def bag(tmp_path):
    tl = demo_timeline([("pick up the red cube", 4), ("put the cube on the towel", 3)])
    return write_bag(tmp_path / "bag", tl.events, "sqlite3"), tl.expected


def test_bag_converts_into_a_dataset_training_can_read(tmp_path, bag, capsys):
    bag_path, expected = bag
    out = tmp_path / "ds"
    assert run_convert("--bag", str(bag_path), "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}: 2 episode(s), 7 frame(s), images 12x16, 5 Hz" in printed
    assert "skipped steps: none" in printed and "refinevla annotate --dataset" in printed
    ds = EpisodeDataset(out)
    frames = list(ds.iter_frames())  # what training iterates over
    assert len(frames) == 7 and ds.num_frames == 7
    assert [(f.episode_index, f.frame_index, f.instruction) for f in frames[3:5]] == [
        (0, 3, "pick up the red cube"), (1, 0, "put the cube on the towel")]
    flat = [(a, im) for exp in expected for a, im in zip(exp["actions"], exp["images"], strict=True)]
    for frame, (action, rgb) in zip(frames, flat, strict=True):
        np.testing.assert_array_equal(frame.action, action)
        np.testing.assert_array_equal(frame.image, rgb)
    stats = load_dataset_stats(out)  # the statistics travel with the dataset
    assert stats.num_frames == 7
    np.testing.assert_allclose(stats.max, np.max([a for a, _ in flat], axis=0))
    source = ds.meta["converted_from"]
    assert source["kind"] == "bag" and source["sources"] == [str(bag_path)] and ds.meta["fps"] == 5.0
    assert source["reports"][0]["frames"] == 7
    assert not list(tmp_path.glob(".ds.*")), "no temp folders left"


def test_rerun_is_a_no_op_and_a_different_conversion_needs_overwrite(tmp_path, bag, capsys):
    bag_path, _ = bag
    out = tmp_path / "ds"
    assert run_convert("--bag", str(bag_path), "--out", str(out)) == 0
    before = snapshot(out)
    assert run_convert("--bag", str(bag_path), "--out", str(out)) == 0
    assert "up to date" in capsys.readouterr().out
    assert snapshot(out) == before, "an up-to-date rerun must not touch the dataset"

    assert run_convert("--bag", str(bag_path), "--out", str(out), "--set", "min_episode_frames=4") == 1
    err = capsys.readouterr().err
    assert "differs from this conversion; pass --overwrite" in err and "left unchanged" in err
    assert snapshot(out) == before

    assert run_convert("--bag", str(bag_path), "--out", str(out), "--set", "min_episode_frames=4",
                       "--overwrite") == 0
    assert "dropped short episodes: 1" in capsys.readouterr().out
    assert len(EpisodeDataset(out)) == 1 and load_dataset_stats(out).num_frames == 4


def test_bad_frame_fails_the_whole_conversion_or_is_dropped_and_counted(tmp_path, capsys):
    tl = demo_timeline([("pick up the spoon", 3), ("stir the pot", 3)])
    i = [n for n, e in enumerate(tl.events) if e[1] == "/refinevla/ee_delta"][4]
    t, topic, _ = tl.events[i]
    tl.events[i] = (t, topic, delta([float("inf"), 0, 0, 0, 0, 0], t))
    bag_path = write_bag(tmp_path / "bag", tl.events)
    out = tmp_path / "ds"
    assert run_convert("--bag", str(bag_path), "--out", str(out)) == 1
    err = capsys.readouterr().err
    assert "episode 1 frame 1" in err and "--drop-bad-frames" in err and "was not created" in err
    assert not out.exists() and not list(tmp_path.glob(".ds.*")), "a failed conversion leaves nothing behind"

    assert run_convert("--bag", str(bag_path), "--out", str(out), "--drop-bad-frames") == 0
    assert "dropped bad frames: 1" in capsys.readouterr().out
    assert [len(e) for e in EpisodeDataset(out)] == [3, 2]


def test_several_bags_make_one_dataset_and_image_sizes_must_agree(tmp_path, capsys):
    a = write_bag(tmp_path / "a", demo_timeline([("open the drawer", 3)]).events)
    b = write_bag(tmp_path / "b", demo_timeline([("close the drawer", 2)]).events, "sqlite3")
    assert run_convert("--bag", str(a), str(b), "--out", str(tmp_path / "ds")) == 0
    ds = EpisodeDataset(tmp_path / "ds")
    assert [e.instruction for e in ds] == ["open the drawer", "close the drawer"]
    assert [r["bag"] for r in ds.meta["converted_from"]["reports"]] == [str(a), str(b)]

    tl = demo_timeline([("wave", 2)])
    tl.events = [(t, tp, image(frame_rgb(0, h=20, w=20), t) if tp == "/camera/image_raw" else m)
                 for t, tp, m in tl.events]
    c = write_bag(tmp_path / "c", tl.events)
    assert run_convert("--bag", str(a), str(c), "--out", str(tmp_path / "ds2")) == 1
    assert "set image_size" in capsys.readouterr().err
    assert run_convert("--bag", str(a), str(c), "--out", str(tmp_path / "ds2"), "--set", "image_size=[8, 8]") == 0
    assert EpisodeDataset(tmp_path / "ds2").load_episode(1).images.shape == (2, 8, 8, 3)


def test_nothing_convertible_explains_why(tmp_path, capsys):
    tl = demo_timeline([("pick", 1)])
    bag_path = write_bag(tmp_path / "bag", tl.events)
    assert run_convert("--bag", str(bag_path), "--out", str(tmp_path / "ds")) == 1
    err = capsys.readouterr().err
    assert "no episodes came out of" in err and "1 episode(s) shorter than min_episode_frames" in err
    assert run_convert("--bag", str(tmp_path / "missing"), "--out", str(tmp_path / "ds")) == 1
    assert "does not exist" in capsys.readouterr().err


def test_a_killed_conversion_leaves_only_a_temp_folder_which_the_next_run_removes(tmp_path, bag):
    bag_path, _ = bag
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".ds.converting-{int(dead.stdout)}"
    (stale / "episodes").mkdir(parents=True)
    assert run_convert("--bag", str(bag_path), "--out", str(tmp_path / "ds")) == 0
    assert not stale.exists() and len(EpisodeDataset(tmp_path / "ds")) == 2


def test_lerobot_dataset_converts(tmp_path, capsys):
    episodes = make_episodes()
    src = write_lerobot_dataset(tmp_path / "lr", episodes, version="v3.0", image_storage="image", fps=10,
                                gripper_convention="plus_minus_one")
    out = tmp_path / "ds"
    assert run_convert("--lerobot", str(src), "--out", str(out), "--set", "gripper_convention=plus_minus_one") == 0
    assert "2 episode(s), 7 frame(s), images 24x32, 10 Hz" in capsys.readouterr().out
    ds = EpisodeDataset(out)
    for got, want in zip(ds, episodes, strict=True):
        assert got.instruction == want.instruction and got.metadata["source"] == "lerobot"
        np.testing.assert_array_equal(got.images, want.images)
        np.testing.assert_allclose(got.actions, want.actions, atol=1e-6)
    assert ds.meta["converted_from"]["settings"]["config"]["gripper_convention"] == "plus_minus_one"
    config = tmp_path / "lr.yaml"
    config.write_text("image_key: observation.images.wrist\n")
    assert run_convert("--lerobot", str(src), "--out", str(tmp_path / "ds2"), "--config", str(config)) == 1
    assert "not a camera" in capsys.readouterr().err


def test_bag_and_lerobot_readers_are_episode_sources(tmp_path, bag):
    """convert drives both formats through the one EpisodeSource protocol: a bag yields its episodes one by one
    (count unknown up front), a LeRobot dataset one list per dataset episode (count known)."""
    bag_path, _ = bag
    lerobot = write_lerobot_dataset(tmp_path / "lr", make_episodes(), image_storage="image")
    readers, fps = convert.open_sources("bag", [bag_path], BagTopicsConfig(), drop_bad_frames=False)
    assert fps is None and all(isinstance(r, EpisodeSource) for r in readers)
    assert readers[0].expected_episodes() is None
    assert [len(pieces) for pieces in readers[0].source_episodes()] == [1, 1]
    assert readers[0].report.to_dict()["episodes"] == 2
    (reader,), fps = convert.open_sources("lerobot", [lerobot], LeRobotConfig(), drop_bad_frames=False)
    assert isinstance(reader, EpisodeSource) and fps == 5.0 and reader.expected_episodes() == 2
    assert [[len(e) for e in pieces] for pieces in reader.source_episodes()] == [[4], [3]]


def test_the_refinevla_command_runs_convert(tmp_path, bag):
    bag_path, _ = bag
    r = subprocess.run([sys.executable, "-m", "refinevla_core", "convert", "--bag", str(bag_path), "--out",
                        str(tmp_path / "ds")], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0, r.stderr
    assert "2 episode(s), 7 frame(s)" in r.stdout
    assert json.loads((tmp_path / "ds" / "meta.json").read_text())["num_frames"] == 7


def test_a_converted_bag_trains_for_a_few_steps(tmp_path):
    """Issue #9's loop end to end on the learner side: bag -> convert -> the trainer reads the dataset and its
    statistics and takes optimizer steps (tiny preset, λ_r = 0: recorded data has no rationales until annotated)."""
    from refinevla_core.training.config import TrainConfig
    from refinevla_core.training.trainer import train

    tl = demo_timeline([("pick up the red cube", 5), ("put the cube on the towel", 4), ("push the cube left", 4)])
    bag_path = write_bag(tmp_path / "bag", tl.events)
    assert run_convert("--bag", str(bag_path), "--out", str(tmp_path / "ds")) == 0
    result = train(TrainConfig(dataset=str(tmp_path / "ds"), preset="tiny", max_steps=2, lambda_rationale=0.0,
                               batch_size=2, output_dir=str(tmp_path / "run"), progress_bar=False, torch_threads=1,
                               eval_every=2, save_every=2, device="cpu"), log=lambda _: None)
    assert result.metrics["finished"] and result.metrics["step"] == 2
    assert result.metrics["data"]["train_frames"] + result.metrics["data"]["val_frames"] == 13
    assert np.isfinite(result.metrics["train"][-1]["loss_action"])
    assert (result.final_checkpoint / "stats.json").is_file(), "the dataset's statistics travel into the checkpoint"
