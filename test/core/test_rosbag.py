"""ROS 2 bags -> Episodes: real bags written with rosbags (sqlite3 and mcap), read back the way `refinevla convert`
reads a recording from a robot."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from refinevla_core.config import ConfigError, load_config
from refinevla_core.data.bag_reader import image_msg_to_rgb, read_bag
from refinevla_core.data.bag_storage import BagRecording, find_msg_dir, make_typestore, salvage_mcap
from refinevla_core.data.bag_topics import BagTopicsConfig
from refinevla_core.data.episode import DataError
from test.core.bagutil import (
    TYPESTORE,
    S,
    Timeline,
    action,
    compressed_png,
    delta,
    demo_timeline,
    float64,
    frame_rgb,
    image,
    status,
    string,
    write_bag,
)

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def assert_matches(episodes, expected):
    assert [e.instruction for e in episodes] == [x["instruction"] for x in expected]
    for ep, exp in zip(episodes, expected, strict=True):
        np.testing.assert_array_equal(ep.actions, np.stack(exp["actions"]))
        np.testing.assert_array_equal(ep.images, np.stack(exp["images"]))


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_teleop_bag_becomes_one_episode_per_instruction(tmp_path, storage):
    tl = demo_timeline([("pick up the red cube", 4), ("put the cube on the towel", 3)])
    bag = write_bag(tmp_path / "bag", tl.events, storage)
    assert (bag / "metadata.yaml").is_file()
    episodes, report = read_bag(bag)
    assert_matches(episodes, tl.expected)
    assert report.episodes == 2 and report.frames == 7 and not report.skipped and not report.recovered
    assert report.action_type == "refinevla/msg/EndEffectorDelta"
    assert episodes[0].metadata["source"] == "rosbag" and episodes[0].metadata["bag"] == str(bag)


def test_custom_types_come_from_the_msg_files_and_round_trip():
    store = make_typestore()
    msg = action([0.01, 0.02, -0.03, 0.1, 0.2, 0.3, 0.0], stamp_ns=5 * S + 7, safe_hold=True)
    back = store.deserialize_cdr(store.serialize_cdr(msg, msg.__msgtype__), "refinevla/msg/Action")
    assert back.delta.z == pytest.approx(-0.03) and back.safe_hold and back.header.stamp.nanosec == 7
    assert store.hash_rihs01("refinevla/msg/EndEffectorDelta").startswith("RIHS01_")


def test_each_action_gets_the_latest_image_before_it_not_a_later_one(tmp_path):
    """Camera at 3x the action rate: the frame must be the newest image received before the action."""
    tl = Timeline()
    tl.add(1 * S, "/refinevla/instruction", string("wipe the table"))
    tl.add(1 * S, "/refinevla/gripper", float64(1.0))
    expected = []
    for k in range(9):
        t = 2 * S + k * (S // 15)
        tl.add(t, "/camera/image_raw", image(frame_rgb(k), t))
        if k % 3 == 1:  # the action arrives 10 ms after image k, 57 ms before image k+1
            tl.add(t + S // 100, "/refinevla/ee_delta", delta([0.01 * k, 0, 0, 0, 0, 0]))
            expected.append(frame_rgb(k))
    episodes, _report = read_bag(write_bag(tmp_path / "bag", tl.events))
    assert len(episodes) == 1 and len(episodes[0]) == 3
    np.testing.assert_array_equal(episodes[0].images, np.stack(expected))
    np.testing.assert_allclose(episodes[0].actions[:, 0], [0.01, 0.04, 0.07], rtol=1e-6)
    assert episodes[0].actions[:, 6].tolist() == [1.0, 1.0, 1.0]


def test_header_time_source_pairs_by_stamp_even_when_images_arrive_late(tmp_path):
    """Policy output: EndEffectorDelta.header.stamp = the stamp of the image it was computed from. The image that
    was used is received *after* a newer image here; only header pairing finds the right one."""
    tl = Timeline()
    tl.add(1 * S, "/refinevla/instruction", string("open the drawer"))
    tl.add(1 * S, "/refinevla/gripper", float64(0.0))
    for k in range(4):
        stamp = 2 * S + k * (S // 5)
        tl.add(stamp + S // 50, "/camera/image_raw", image(frame_rgb(k), stamp))
        tl.add(stamp + S // 10, "/refinevla/ee_delta", delta([k, 0, 0, 0, 0, 0], stamp_ns=stamp))
    bag = write_bag(tmp_path / "bag", tl.events)
    by_header, _ = read_bag(bag, BagTopicsConfig(time_source="header"))
    np.testing.assert_array_equal(by_header[0].images, np.stack([frame_rgb(k) for k in range(4)]))
    assert by_header[0].metadata["time_source"] == "header"


def test_zero_header_stamps_with_header_time_source_name_the_fix(tmp_path):
    tl = demo_timeline([("stack the blocks", 3)])
    tl.events = [(t, topic, delta([0] * 6) if topic.endswith("ee_delta") else m) for t, topic, m in tl.events]
    with pytest.raises(DataError, match=r"zero header stamp.*time_source: bag"):
        read_bag(write_bag(tmp_path / "bag", tl.events), BagTopicsConfig(time_source="header"))


def test_pause_longer_than_max_gap_splits_an_episode_and_short_ones_are_counted(tmp_path):
    tl = demo_timeline([("sweep the beans", 5)])
    # move the last 3 steps 2 s later: a pause > max_gap_s (1 s) between actions 1 and 2
    first_late = sorted(t for t, topic, _ in tl.events if topic == "/camera/image_raw")[2]
    tl.events = [(t + 2 * S if t >= first_late else t, topic, m) for t, topic, m in tl.events]
    episodes, report = read_bag(write_bag(tmp_path / "bag", tl.events))
    assert [len(e) for e in episodes] == [2, 3]
    assert all(e.instruction == "sweep the beans" for e in episodes)
    episodes, report = read_bag(tmp_path / "bag", BagTopicsConfig(min_episode_frames=3))
    assert [len(e) for e in episodes] == [3] and report.dropped_short_episodes == 1


def test_steps_without_instruction_or_image_are_skipped_and_counted(tmp_path):
    tl = demo_timeline([("close the box", 3)], t0=10 * S)
    tl.add(9 * S, "/refinevla/ee_delta", delta([0.5] * 6))  # before any instruction
    tl.add(10 * S + 1, "/refinevla/ee_delta", delta([0.5] * 6))  # instruction known, no image yet
    _, report = read_bag(write_bag(tmp_path / "bag", tl.events), BagTopicsConfig(initial_gripper=1.0))
    assert report.skipped == {"before_first_instruction": 1, "before_first_image": 1}
    assert report.frames == 3 and report.actions == 5


def test_stale_image_is_skipped(tmp_path):
    tl = demo_timeline([("fold the cloth", 3)])
    last = max(t for t, _, _ in tl.events)
    tl.add(last + 3 * S // 2, "/refinevla/ee_delta", delta([0.1] * 6))  # 1.5 s after the last image
    tl.add(last + 3 * S // 2, "/refinevla/gripper", float64(1.0))
    episodes, report = read_bag(write_bag(tmp_path / "bag", tl.events), BagTopicsConfig(max_gap_s=5.0))
    assert report.skipped == {"stale_image": 1} and [len(e) for e in episodes] == [3]


def test_nan_action_names_bag_episode_frame_and_can_be_dropped(tmp_path):
    tl = demo_timeline([("pick up the spoon", 2), ("put the spoon in the cup", 4)])
    deltas = [i for i, (_, topic, _) in enumerate(tl.events) if topic == "/refinevla/ee_delta"]
    t, topic, _ = tl.events[deltas[4]]  # episode 1, frame 2
    tl.events[deltas[4]] = (t, topic, delta([0.0, float("nan"), 0, 0, 0, 0], t))
    bag = write_bag(tmp_path / "bag", tl.events)
    with pytest.raises(DataError, match=r"episode 1 frame 2 .*non-finite.*--drop-bad-frames") as err:
        read_bag(bag)
    assert str(bag) in str(err.value)
    episodes, report = read_bag(bag, drop_bad_frames=True)
    assert [len(e) for e in episodes] == [2, 3] and report.dropped_bad_frames == 1
    kept = [a for i, a in enumerate(tl.expected[1]["actions"]) if i != 2]
    np.testing.assert_array_equal(episodes[1].actions, np.stack(kept))


def test_missing_gripper_is_an_error_naming_initial_gripper(tmp_path):
    tl = demo_timeline([("push the button", 3)])
    tl.events = [e for e in tl.events if e[1] != "/refinevla/gripper"]
    bag = write_bag(tmp_path / "bag", tl.events)
    with pytest.raises(DataError, match=r"no gripper value.*initial_gripper"):
        read_bag(bag)
    episodes, _ = read_bag(bag, BagTopicsConfig(initial_gripper=1.0))
    assert episodes[0].actions[:, 6].tolist() == [1.0, 1.0, 1.0]


def test_gripper_outside_bridge_range_is_an_error(tmp_path):
    tl = demo_timeline([("open the gripper", 2)])
    tl.events = [(t, tp, float64(-1.0) if tp == "/refinevla/gripper" else m) for t, tp, m in tl.events]
    with pytest.raises(DataError, match=r"outside \[0, 1\].*Bridge"):
        read_bag(write_bag(tmp_path / "bag", tl.events))


def test_action_messages_carry_gripper_and_safe_holds_are_skipped(tmp_path):
    tl = Timeline()
    tl.add(1 * S, "/refinevla/instruction", string("move left"))
    want = []
    for k in range(4):
        t = 2 * S + k * S // 5
        a = [0.0, 0.01 * k, 0, 0, 0, 0, 0.25 * k]
        tl.add(t, "/camera/image_raw", image(frame_rgb(k), t))
        tl.add(t + S // 50, "/refinevla/action", action(a, t, safe_hold=(k == 2)))
        if k != 2:
            want.append(a)
    bag = write_bag(tmp_path / "bag", tl.events)
    episodes, report = read_bag(bag, BagTopicsConfig(action_topic="/refinevla/action"))
    np.testing.assert_allclose(episodes[0].actions, np.array(want, np.float32))
    assert report.skipped == {"safe_hold": 1} and report.action_type == "refinevla/msg/Action"


def test_episode_status_splits_sim_episodes_and_records_success(tmp_path):
    tl = Timeline()
    tl.add(1 * S, "/refinevla/instruction", string("push the cube to the goal"))
    t = 2 * S
    for ep, success in ((0, True), (1, False)):
        t += 3  # the reset status of episode 1 arrives after the last status of episode 0
        tl.add(t, "/refinevla/episode_status", status(ep, 0, False, seed=100 + ep))
        for s in range(3):
            t += S // 10
            tl.add(t, "/camera/image_raw", image(frame_rgb(s), t))
            tl.add(t + 1, "/refinevla/action", action([0.01, 0, 0, 0, 0, 0, 1.0], t))
            tl.add(t + 2, "/refinevla/episode_status", status(ep, s + 1, success and s == 2, seed=100 + ep))
    cfg = BagTopicsConfig(action_topic="/refinevla/action")
    episodes, _ = read_bag(write_bag(tmp_path / "bag", tl.events), cfg)
    assert [(len(e), e.success, e.seed, e.task) for e in episodes] == [
        (3, True, 100, "PushCube-v1"), (3, False, 101, "PushCube-v1")]


def test_compressed_images_and_resizing(tmp_path):
    tl = demo_timeline([("pour the water", 3)])
    tl.events = [(t, "/camera/compressed", compressed_png(m.data.reshape(m.height, m.width, 3)))
                 if tp == "/camera/image_raw" else (t, tp, m) for t, tp, m in tl.events]
    bag = write_bag(tmp_path / "bag", tl.events)
    episodes, _ = read_bag(bag, BagTopicsConfig(image_topic="/camera/compressed"))
    np.testing.assert_array_equal(episodes[0].images, np.stack(tl.expected[0]["images"]))
    small, _ = read_bag(bag, BagTopicsConfig(image_topic="/camera/compressed", image_size=[6, 8]))
    assert small[0].images.shape == (3, 6, 8, 3)


def test_image_decoding_of_encodings():
    rgb = frame_rgb(3)
    np.testing.assert_array_equal(image_msg_to_rgb(image(rgb, encoding="bgr8"), "sensor_msgs/msg/Image"), rgb)
    bad = image(rgb)
    bad.encoding = "bgra16"
    with pytest.raises(ValueError, match=r"'bgra16' is not supported"):
        image_msg_to_rgb(bad, "sensor_msgs/msg/Image")
    short = image(rgb)
    short.data = short.data[:-5]
    with pytest.raises(ValueError, match=r"truncated"):
        image_msg_to_rgb(short, "sensor_msgs/msg/Image")


def test_undecodable_image_names_the_frame_or_is_dropped(tmp_path):
    tl = demo_timeline([("lift the lid", 3)])
    first = next(i for i, e in enumerate(tl.events) if e[1] == "/camera/image_raw")
    _t, _tp, m = tl.events[first]
    m.encoding = "yuv422"
    with pytest.raises(DataError, match=r"episode 0 frame 0.*'yuv422' is not supported"):
        read_bag(write_bag(tmp_path / "a", tl.events))
    episodes, report = read_bag(tmp_path / "a", drop_bad_frames=True)
    assert len(episodes[0]) == 2 and report.dropped_bad_frames == 1


def test_changing_image_size_inside_an_episode_names_the_fix(tmp_path):
    tl = demo_timeline([("grab the pen", 3)])
    last = max(i for i, e in enumerate(tl.events) if e[1] == "/camera/image_raw")
    t, tp, _ = tl.events[last]
    tl.events[last] = (t, tp, image(frame_rgb(0, h=10, w=10), t))
    with pytest.raises(DataError, match=r"frame 2: image size \(10, 10\).*image_size"):
        read_bag(write_bag(tmp_path / "bag", tl.events))


def test_missing_topic_and_wrong_type_list_what_the_bag_has(tmp_path):
    tl = demo_timeline([("pick", 2)])
    bag = write_bag(tmp_path / "bag", tl.events)
    with pytest.raises(DataError, match=r"no '/robot/cmd' topic \(config key action_topic\).*/refinevla/ee_delta \["):
        read_bag(bag, BagTopicsConfig(action_topic="/robot/cmd"))
    with pytest.raises(DataError, match=r"action_topic must be one of"):
        read_bag(bag, BagTopicsConfig(action_topic="/refinevla/gripper"))
    no_instr = write_bag(tmp_path / "b", [e for e in tl.events if e[1] != "/refinevla/instruction"])
    with pytest.raises(DataError, match=r"no instruction messages.*default_instruction"):
        read_bag(no_instr)
    episodes, _ = read_bag(no_instr, BagTopicsConfig(default_instruction="pick  it up"))
    assert episodes[0].instruction == "pick it up"


def test_not_a_bag_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"does not exist"):
        read_bag(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no metadata.yaml and 0 storage files"):
        read_bag(tmp_path / "empty")
    (tmp_path / "x.mcap").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"not an mcap file"):
        read_bag(tmp_path / "x.mcap")


KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from test.core.bagutil import TOPIC_TYPES, TYPESTORE, demo_timeline
    from refinevla_core.data.bag_storage import BagRecording
    tl = demo_timeline([("pick up the cube", 4), ("put it down", 3)])
    rec = BagRecording(Path(sys.argv[1]), storage=sys.argv[2], typestore=TYPESTORE)
    for topic in dict.fromkeys(tp for _, tp, _ in tl.events):
        rec.add_topic(topic, TOPIC_TYPES[topic])
    events = sorted(tl.events, key=lambda e: e[0])
    flush_after = int(sys.argv[3]) if sys.argv[3] != "end" else len(events) - 1
    for i, (t, topic, msg) in enumerate(events):
        rec.write_message(topic, t, msg)
        if i == flush_after:
            rec.flush()
    os.kill(os.getpid(), signal.SIGKILL)  # what `kill -9` does: no close(), no metadata.yaml, no mcap footer
""")


@pytest.mark.parametrize(("storage", "flush_after", "episodes_expected"), [
    ("mcap", "13", 1),  # flushed after episode 0 (instruction + 4 x (image, delta, gripper)), then more writes
    ("sqlite3", "13", 1),  # ... which leave a hot journal behind: rolled back in a copy
    ("sqlite3", "end", 2),  # flushed after the last write: no journal, the database is read in place
])
def test_a_killed_recording_reads_back_up_to_its_last_flush(tmp_path, storage, flush_after, episodes_expected):
    bag = tmp_path / "bag"
    r = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(bag), storage, flush_after], cwd=ROOT,
                       capture_output=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not (bag / "metadata.yaml").exists()
    if storage == "sqlite3":
        assert (bag / "bag.db3-journal").exists() == (flush_after != "end")
    files_before = {p.name: p.stat().st_size for p in bag.iterdir()}
    episodes, report = read_bag(bag)
    expected = demo_timeline([("pick up the cube", 4), ("put it down", 3)]).expected
    assert report.recovered and "not closed" in report.warnings[0]
    assert_matches(episodes, expected[:episodes_expected])
    assert {p.name: p.stat().st_size for p in bag.iterdir()} == files_before, "recovery must not modify the bag"


def test_salvage_cuts_a_torn_mcap_at_the_last_complete_record(tmp_path):
    tl = demo_timeline([("pick up the cube", 3)])
    bag = write_bag(tmp_path / "bag", tl.events, "mcap")
    whole = (bag / "bag.mcap").read_bytes()
    torn = tmp_path / "torn.mcap"
    torn.write_bytes(whole[: len(whole) // 3])  # cut through the middle of the data section
    kept = salvage_mcap(torn, tmp_path / "fixed.mcap")
    assert 8 < kept <= len(whole) // 3
    with pytest.raises(DataError, match=r"its topics: none"):  # the only chunk was torn: nothing survives, said so
        read_bag(torn)


def test_a_truncated_bag_says_so_and_names_the_command_that_reads_what_it_holds(tmp_path):
    """A closed bag (metadata.yaml present) whose mcap was cut short, e.g. by an interrupted copy: rosbags only says
    "File end magic is invalid"; the error names the truncation and the salvage path (the storage file itself)."""
    tl = demo_timeline([("pick up the cube", 3)])
    bag = write_bag(tmp_path / "bag", tl.events, "mcap")
    storage = bag / "bag.mcap"
    storage.write_bytes(storage.read_bytes()[:-40])
    with pytest.raises(DataError) as error:
        read_bag(bag)
    message = str(error.value)
    assert "bag.mcap is truncated (an interrupted recording or copy?)" in message
    assert f"refinevla convert --bag {storage} --out DATASET" in message
    episodes, report = read_bag(storage)  # the hinted path: cut at the last complete record, said so
    assert report.recovered and len(episodes) == 1


def test_a_cut_sqlite_bag_says_it_is_damaged(tmp_path):
    bag = write_bag(tmp_path / "bag", demo_timeline([("pick up the cube", 3)]).events, "sqlite3")
    storage = bag / "bag.db3"
    storage.write_bytes(storage.read_bytes()[: storage.stat().st_size // 2])
    with pytest.raises(DataError, match=r"bag.db3 is damaged \(an interrupted copy\?\); copy the bag again"):
        read_bag(bag)


def test_recording_refuses_an_existing_path_and_unknown_types(tmp_path):
    (tmp_path / "bag").mkdir()
    with pytest.raises(DataError, match=r"choose a new --out"):
        BagRecording(tmp_path / "bag")
    with BagRecording(tmp_path / "b2", typestore=TYPESTORE) as rec, pytest.raises(DataError, match=r"unknown"):
        rec.add_topic("/x", "my_pkg/msg/Nope")


def test_config_yaml_matches_the_dataclass_and_rejects_typos(tmp_path):
    assert load_config(BagTopicsConfig, ROOT / "config/bag_topics.yaml") == BagTopicsConfig()
    bad = tmp_path / "b.yaml"
    bad.write_text("image_topc: /cam\n")
    with pytest.raises(ConfigError, match=r"image_topc"):
        load_config(BagTopicsConfig, bad)
    with pytest.raises(ConfigError, match=r"time_source"):
        load_config(BagTopicsConfig, None, {"time_source": "wall"})
    assert "/camera/camera_info" in BagTopicsConfig().record_topics()


def test_environment_override_for_msg_dir_is_honoured(tmp_path, monkeypatch):
    monkeypatch.setenv("REFINEVLA_MSG_DIR", str(tmp_path))
    assert find_msg_dir() != tmp_path  # no .msg files there: falls through to the checkout
    for p in (ROOT / "msg").glob("*.msg"):
        (tmp_path / p.name).write_text(p.read_text())
    assert find_msg_dir() == tmp_path
