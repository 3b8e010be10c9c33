"""LeRobot datasets (v2.1 and v3.0 layouts, mp4 video or in-parquet images) -> Episodes, on small datasets written
with pyarrow and PyAV by the tests' LeRobot writer (test/core/lerobot_writer.py), then edited with the same libraries
where a test needs a dataset the writer would refuse to produce (joint actions, NaN, several cameras, a task
change)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refinevla_core.config import load_config
from refinevla_core.data.episode import DataError, Episode
from refinevla_core.data.lerobot import LeRobotConfig, LeRobotReader, check_action_layout
from refinevla_core.gripper import from_bridge, to_bridge
from test.core.lerobot_writer import write_lerobot_dataset


def smooth_image(k: int, h: int = 24, w: int = 32) -> np.ndarray:
    """Video codecs keep smooth images close; each k is clearly different from its neighbours."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 4 + k * 20, y * 4 + 40, np.full_like(x, 200 - k * 15)], -1).astype(np.uint8)


def make_episodes(lengths=(4, 3), instructions=("pick up the carrot", "put the carrot in the pot")):
    eps = []
    k = 0
    for e, (n, text) in enumerate(zip(lengths, instructions, strict=True)):
        rng = np.random.default_rng(e)
        actions = rng.uniform(-0.05, 0.05, size=(n, 7)).astype(np.float32)
        actions[:, 6] = np.arange(n) % 2
        eps.append(Episode(images=np.stack([smooth_image(k + i) for i in range(n)]), actions=actions,
                           instruction=text))
        k += n
    return eps


def assert_same_frames(got, want, exact_images):
    assert [g.instruction for g in got] == [w.instruction for w in want]
    source = np.concatenate([x.images for x in want]).astype(int)
    first = np.cumsum([0] + [len(x) for x in want])
    for e, (g, w) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_array_equal(g.actions, w.actions)
        if exact_images:
            np.testing.assert_array_equal(g.images, w.images)
        else:  # lossy video: every frame is closest to its own source frame, and close to it
            for i, frame in enumerate(g.images.astype(int)):
                errors = np.abs(source - frame).mean(axis=(1, 2, 3))
                own = first[e] + i
                assert int(np.argmin(errors)) == own and errors[own] < 6.0


def edit_info(root: Path, change) -> None:
    path = root / "meta/info.json"
    info = json.loads(path.read_text())
    change(info)
    path.write_text(json.dumps(info))


def data_files(root: Path) -> list[Path]:
    return sorted((root / "data").rglob("*.parquet"))


def rewrite_column(path: Path, name: str, values) -> None:
    table = pq.read_table(path)
    table = table.set_column(table.column_names.index(name), name, pa.array(values, type=table.column(name).type))
    pq.write_table(table, path)


@pytest.mark.parametrize(("version", "storage", "codec"), [
    ("v2.1", "video", "libx264"),
    ("v3.0", "video", "libsvtav1"),  # AV1 is what LeRobot itself writes
    ("v2.1", "image", ""),
    ("v3.0", "image", ""),
])
def test_round_trip_through_each_layout(tmp_path, version, storage, codec):
    want = make_episodes()
    root = write_lerobot_dataset(tmp_path / "ds", want, version=version, image_storage=storage,
                                 codec=codec or "libx264")
    reader = LeRobotReader(root)
    got = list(reader.episodes())
    assert_same_frames(got, want, exact_images=storage == "image")
    assert reader.version == version and reader.image_key == "observation.images.image_0"
    assert reader.report.episodes == 2 and reader.report.frames == 7
    assert got[1].metadata == {"source": "lerobot", "dataset": str(root), "lerobot_episode": 1, "first_frame": 0,
                               "image_key": "observation.images.image_0", "fps": 5.0}


def test_v3_layout_packs_episodes_into_shared_files(tmp_path):
    root = write_lerobot_dataset(tmp_path / "ds", make_episodes(), version="v3.0")
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == ["data/chunk-000/file-000.parquet", "meta/episodes/chunk-000/file-000.parquet",
                     "meta/info.json", "meta/stats.json", "meta/tasks.parquet",
                     "videos/observation.images.image_0/chunk-000/file-000.mp4"]
    rows = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert rows[1]["videos/observation.images.image_0/from_timestamp"] == pytest.approx(4 / 5.0)
    assert rows[1]["dataset_from_index"] == 4 and rows[1]["tasks"] == ["put the carrot in the pot"]


def test_only_selected_episodes_are_read(tmp_path):
    root = write_lerobot_dataset(tmp_path / "ds", make_episodes((2, 3, 2), ("a b", "c d", "e f")), version="v3.0")
    got = list(LeRobotReader(root, LeRobotConfig(episodes=[2, 0])).episodes())
    assert [g.instruction for g in got] == ["e f", "a b"]
    with pytest.raises(DataError, match=r"episodes \[7\] do not exist"):
        LeRobotReader(root, LeRobotConfig(episodes=[7])).episode_indices()


def test_gripper_conventions_convert_to_bridge(tmp_path):
    want = make_episodes()
    root = write_lerobot_dataset(tmp_path / "ds", want, image_storage="image", gripper_convention="plus_minus_one")
    stored = pq.read_table(data_files(root)[0]).column("action").to_pylist()
    assert {round(row[6]) for row in stored} == {-1, 1}
    with pytest.raises(DataError, match=r"span \[-1.000, 1.000\].*plus_minus_one"):
        list(LeRobotReader(root).episodes())
    got = list(LeRobotReader(root, LeRobotConfig(gripper_convention="plus_minus_one")).episodes())
    assert_same_frames(got, want, exact_images=True)
    g = np.array([0.0, 0.25, 1.0])
    for conv in ("bridge", "plus_minus_one", "closed_is_one"):
        np.testing.assert_allclose(to_bridge(from_bridge(g, conv), conv), g)


@pytest.mark.parametrize(("names", "ok"), [
    (["x", "y", "z", "roll", "pitch", "yaw", "gripper"], True),
    ({"motors": ["delta_x", "delta_y", "delta_z", "delta_roll", "delta_pitch", "delta_yaw", "gripper_open"]}, True),
    (["ee_dx", "ee_dy", "ee_dz", "ee_droll", "ee_dpitch", "ee_dyaw", "grip"], True),
    (["shoulder_pan.pos", "shoulder_lift.pos", "elbow_flex.pos", "wrist_flex.pos", "wrist_roll.pos",
      "waist.pos", "gripper.pos"], False),
    (["yaw", "pitch", "roll", "x", "y", "z", "gripper"], False),  # right names, wrong order
    (None, False),
])
def test_action_layout_check(names, ok):
    feature = {"dtype": "float32", "shape": [7], "names": names}
    if ok:
        check_action_layout(feature, "action", "info.json", assume_layout=False)
        return
    with pytest.raises(DataError, match="assume_action_layout: true"):
        check_action_layout(feature, "action", "info.json", assume_layout=False)
    check_action_layout(feature, "action", "info.json", assume_layout=True)  # a human vouches for the order


def test_joint_space_dataset_is_refused_with_a_clear_error(tmp_path):
    root = write_lerobot_dataset(tmp_path / "ds", make_episodes(), image_storage="image")
    joints = [f"joint_{i}" for i in range(6)] + ["gripper"]
    edit_info(root, lambda info: info["features"]["action"].update(names=joints))
    with pytest.raises(DataError, match=r"joint-space actions.*Convert them to EE deltas"):
        LeRobotReader(root)
    edit_info(root, lambda info: info["features"]["action"].update(shape=[14], names=None))  # bimanual ALOHA-style
    with pytest.raises(DataError, match=r"shape \[14\]; refinevla trains on 7-D actions"):
        LeRobotReader(root)


def test_several_cameras_need_image_key(tmp_path):
    want = make_episodes()
    root = write_lerobot_dataset(tmp_path / "ds", want, image_storage="image", image_key="observation.images.top")
    wrist = {"dtype": "video", "shape": [24, 32, 3], "names": ["height", "width", "channel"]}
    edit_info(root, lambda info: info["features"].update({"observation.images.wrist": wrist}))
    with pytest.raises(DataError, match=r"2 cameras .*image_key"):
        LeRobotReader(root)
    with pytest.raises(DataError, match="not a camera"):
        LeRobotReader(root, LeRobotConfig(image_key="observation.state"))
    got = list(LeRobotReader(root, LeRobotConfig(image_key="observation.images.top")).episodes())
    assert_same_frames(got, want, exact_images=True)


def test_nan_action_names_episode_and_frame_and_can_be_dropped(tmp_path):
    want = make_episodes()
    root = write_lerobot_dataset(tmp_path / "ds", want, version="v2.1", image_storage="image")
    path = data_files(root)[1]
    rows = pq.read_table(path).column("action").to_pylist()
    rows[2][3] = float("nan")
    rewrite_column(path, "action", rows)
    with pytest.raises(DataError, match=r"episode 1 frame 2: non-finite action.*--drop-bad-frames"):
        list(LeRobotReader(root).episodes())
    reader = LeRobotReader(root)
    got = list(reader.episodes(drop_bad_frames=True))
    assert [len(g) for g in got] == [4, 2] and reader.report.dropped_bad_frames == 1
    np.testing.assert_array_equal(got[1].actions, want[1].actions[[0, 1]])


def test_task_change_inside_an_episode_splits_it(tmp_path):
    root = write_lerobot_dataset(tmp_path / "ds", make_episodes(), version="v3.0", image_storage="image")
    tasks = pq.read_table(root / "meta/tasks.parquet")
    pq.write_table(pa.table({"task_index": [*tasks.column("task_index").to_pylist(), 2],
                             "task": [*tasks.column("task").to_pylist(), "now lift the pot"]}),
                   root / "meta/tasks.parquet")
    path = data_files(root)[0]
    task_index = pq.read_table(path).column("task_index").to_pylist()
    task_index[5:] = [2, 2]  # the last two frames of episode 1 get a new instruction
    rewrite_column(path, "task_index", task_index)
    reader = LeRobotReader(root)
    got = list(reader.episodes())
    assert [(g.instruction, len(g), g.metadata["first_frame"]) for g in got] == [
        ("pick up the carrot", 4, 0), ("put the carrot in the pot", 1, 0), ("now lift the pot", 2, 1)]
    assert reader.report.split_at_task_change == 1


def test_damaged_or_foreign_datasets_fail_clearly(tmp_path):
    with pytest.raises(DataError, match=r"no meta/info.json"):
        LeRobotReader(tmp_path)
    root = write_lerobot_dataset(tmp_path / "ds", make_episodes(), version="v3.0")
    edit_info(root, lambda info: info.update(codebase_version="v1.6"))
    with pytest.raises(DataError, match=r"'v1.6' is not supported"):
        LeRobotReader(root)
    edit_info(root, lambda info: info.update(codebase_version="v3.0"))
    (root / "videos/observation.images.image_0/chunk-000/file-000.mp4").write_bytes(b"not a video")
    with pytest.raises(DataError, match="cannot be decoded"):
        list(LeRobotReader(root).episodes())
    data_files(root)[0].write_bytes(b"PAR1 truncated")
    with pytest.raises(DataError, match="not a readable parquet file"):
        list(LeRobotReader(root).episodes())


def test_video_shorter_than_the_parquet_is_detected(tmp_path):
    root = write_lerobot_dataset(tmp_path / "ds", make_episodes(), version="v2.1")
    path = data_files(root)[0]
    rewrite_column(path, "timestamp", [0.0, 0.2, 0.4, 2.0])  # frame 3 claims t = 2.0 s; the video ends at 0.6 s
    with pytest.raises(DataError, match=r"frame 3: no video frame within .* of t=2.000 s"):
        list(LeRobotReader(root).episodes())


def test_writer_refuses_to_overwrite_and_resizing_works(tmp_path):
    (tmp_path / "ds").mkdir()
    with pytest.raises(DataError, match="already exists"):
        write_lerobot_dataset(tmp_path / "ds", make_episodes())
    root = write_lerobot_dataset(tmp_path / "ds2", make_episodes(), image_storage="image")
    got = list(LeRobotReader(root, load_config(LeRobotConfig, None, {"image_size": [12, 16]})).episodes())
    assert got[0].images.shape == (4, 12, 16, 3)
    assert not list(tmp_path.glob(".*writing")), "no temp folder left behind"
