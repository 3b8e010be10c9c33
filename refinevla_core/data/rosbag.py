"""ROS 2 bags -> Episodes, and the bag writer behind `refinevla record`: the real-robot half of the data loop.

A WidowX owner records camera, instruction and end-effector commands with `refinevla record` (or `ros2 bag record`),
and `refinevla convert --bag` turns the bag into the project's episode format. Everything here uses rosbags
(sqlite3 and mcap storage, no ROS install needed), so conversion runs on a training server without ROS.

How a bag becomes episodes (topic names and knobs live in BagTopicsConfig / config/bag_topics.yaml):

- Every message on the action topic (refinevla/msg/EndEffectorDelta, or refinevla/msg/Action which carries the
  gripper too) is one step. Its image is the LATEST camera image at or before the action (no image from the future
  can leak into a frame); its gripper is the latest std_msgs/Float64 on the gripper topic at or before the action
  (plus `gripper_slack_s`, because two publishers of one control step arrive in either order).
- `time_source: bag` pairs by receive time (what the recorder saw); `time_source: header` pairs by header stamps,
  exact for policy output, whose EndEffectorDelta stamp is the stamp of the image it was computed from.
- Episodes end where the instruction text changes, where EpisodeStatus.episode changes (sim bridge recordings), and
  at a pause of more than `max_gap_s` between action messages.
- Non-finite actions raise DataError naming the bag, episode, frame and time; `drop_bad_frames` drops them instead
  and counts them. Steps that cannot make a frame (no instruction or image yet, a stale image, a guard's safe hold)
  are skipped and counted in the report — never silently.

A bag whose recorder was killed (no metadata.yaml) is still read: sqlite3 storage up to its last commit, mcap up to its
last complete record (see `open_bag`); BagRecording.flush() is what puts data there.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import shutil
import sqlite3
import struct
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from refinevla_core.data.episode import DataError, Episode
from refinevla_core.data.images import compressed_to_rgb, raw_to_rgb, resize_rgb

# ---- message types ---------------------------------------------------------------------------------------------

PACKAGE = "refinevla"
IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
ACTION_TYPES = ("refinevla/msg/EndEffectorDelta", "refinevla/msg/Action")
GRIPPER_TYPES = ("std_msgs/msg/Float64", "std_msgs/msg/Float32")
INSTRUCTION_TYPES = ("std_msgs/msg/String",)
STATUS_TYPES = ("refinevla/msg/EpisodeStatus",)


def find_msg_dir() -> Path:
    """The folder holding refinevla's msg/*.msg: the source checkout, or an installed ROS prefix."""
    candidates = []
    if env := os.environ.get("REFINEVLA_MSG_DIR"):
        candidates.append(Path(env))
    candidates.append(Path(__file__).resolve().parents[2] / "msg")
    for prefix in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep):
        if prefix:
            candidates.append(Path(prefix) / "share" / PACKAGE / "msg")
    candidates.append(Path(sys.prefix) / "share" / PACKAGE / "msg")
    for c in candidates:
        if (c / "EndEffectorDelta.msg").is_file():
            return c
    raise DataError(
        f"refinevla's message definitions (msg/*.msg) were not found in {[str(c) for c in candidates]}; "
        "set REFINEVLA_MSG_DIR to the folder holding EndEffectorDelta.msg"
    )


def refinevla_types() -> dict[str, Any]:
    """rosbags type definitions of refinevla/msg/* parsed from the .msg files (get_types_from_msg)."""
    from rosbags.typesys import get_types_from_msg

    types: dict[str, Any] = {}
    for path in sorted(find_msg_dir().glob("*.msg")):
        types.update(get_types_from_msg(path.read_text(), f"{PACKAGE}/msg/{path.stem}"))
    return types


def make_typestore() -> Any:
    """A rosbags typestore with every ROS 2 Jazzy standard type plus refinevla's own messages."""
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_JAZZY)
    store.register(refinevla_types())
    return store


def stamp_ns(header: Any) -> int:
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


# ---- images ----------------------------------------------------------------------------------------------------

# encoding -> (channels, order of R,G,B within the pixel or None for grey); the same set the ROS nodes accept
def image_msg_to_rgb(msg: Any, msgtype: str) -> np.ndarray:
    """A deserialized sensor_msgs Image / CompressedImage -> HxWx3 uint8 RGB; ImageConversionError (a ValueError)
    says what is wrong."""
    if msgtype.endswith("CompressedImage"):
        return compressed_to_rgb(msg.data, msg.format)
    return raw_to_rgb(msg.encoding, msg.height, msg.width, msg.step, msg.data)


# ---- configuration ---------------------------------------------------------------------------------------------


@dataclass
class BagTopicsConfig:
    """Which topics of a bag make a frame, and how they are aligned in time (config/bag_topics.yaml)."""

    image_topic: str = "/camera/image_raw"  # sensor_msgs/Image or sensor_msgs/CompressedImage
    instruction_topic: str = "/refinevla/instruction"  # std_msgs/String
    action_topic: str = "/refinevla/ee_delta"  # refinevla/EndEffectorDelta, or refinevla/Action (has the gripper)
    gripper_topic: str = "/refinevla/gripper"  # std_msgs/Float64, Bridge convention 1 = open, 0 = closed
    episode_status_topic: str = "/refinevla/episode_status"  # optional; "" to ignore
    extra_record_topics: list[str] = field(default_factory=lambda: ["/camera/camera_info"])  # recorded, not converted
    time_source: Literal["bag", "header"] = "bag"  # how an action finds its image: receive times or header stamps
    max_gap_s: float = 1.0  # a pause longer than this between action messages ends an episode
    gripper_slack_s: float = 0.05  # a gripper message up to this long after its action still belongs to it
    max_image_age_s: float = 1.0  # an action whose latest image is older than this is skipped (camera dropped out)
    initial_gripper: float | None = None  # gripper before the first gripper message (None: that is an error)
    default_instruction: str = ""  # used when the bag has no instruction messages at all
    skip_safe_hold: bool = True  # refinevla/Action steps a guard replaced with "no motion" are not demonstrations
    min_episode_frames: int = 2  # shorter episodes are dropped (and counted)
    image_size: list[int] | None = None  # [height, width] to resize to; None keeps the camera's size
    task: str = ""  # Episode.task for every converted episode (EpisodeStatus.task wins when recorded)

    def __post_init__(self) -> None:
        if not self.action_topic or not self.image_topic:
            raise ValueError("action_topic and image_topic must name topics")
        if self.max_gap_s <= 0 or self.max_image_age_s <= 0 or self.gripper_slack_s < 0:
            raise ValueError("max_gap_s and max_image_age_s must be > 0, gripper_slack_s >= 0")
        if self.image_size is not None and (len(self.image_size) != 2 or min(self.image_size) <= 0):
            raise ValueError(f"image_size must be [height, width] with positive values; got {self.image_size}")
        if self.initial_gripper is not None and not 0.0 <= self.initial_gripper <= 1.0:
            raise ValueError(f"initial_gripper must be in [0, 1] (1 = open); got {self.initial_gripper}")
        if self.min_episode_frames < 1:
            raise ValueError("min_episode_frames must be >= 1")

    def record_topics(self) -> list[str]:
        """The topics `refinevla record` subscribes to by default: everything conversion reads, plus extras."""
        topics = [self.image_topic, self.instruction_topic, self.action_topic, self.gripper_topic,
                  self.episode_status_topic, *self.extra_record_topics]
        return list(dict.fromkeys(t for t in topics if t))


# ---- writing (the recorder's storage) --------------------------------------------------------------------------


class BagRecording:
    """A rosbags Writer plus `flush()`, so that a recorder killed with SIGKILL leaves a readable bag.

    rosbags commits sqlite3 storage and writes mcap chunks only on close. flush() commits the sqlite3 transaction,
    or closes the pending mcap chunk and fsyncs the file; `open_bag` then reads such a bag without metadata.yaml.
    flush() reaches into rosbags' storage objects (rosbags 0.11: Sqlite3Writer.conn, McapWriter.close_chunk/bio);
    test/core/test_rosbag.py and test/ros/test_record.py check that a killed recording reads back.
    """

    def __init__(self, path: str | Path, storage: Literal["mcap", "sqlite3"] = "mcap",
                 typestore: Any | None = None) -> None:
        from rosbags.rosbag2 import StoragePlugin, Writer, WriterError

        self.path = Path(path)
        self.typestore = typestore if typestore is not None else make_typestore()
        plugin = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}.get(storage)
        if plugin is None:
            raise DataError(f"bag storage {storage!r} is not supported; use mcap or sqlite3")
        self.storage = storage
        try:
            self._writer = Writer(self.path, version=Writer.VERSION_LATEST, storage_plugin=plugin)
            self._writer.open()
        except WriterError as e:
            raise DataError(f"cannot create bag {self.path}: {e} (choose a new --out path)") from e
        self._connections: dict[str, Any] = {}
        self.counts: Counter[str] = Counter()
        self.closed = False

    def knows_type(self, msgtype: str) -> bool:
        return msgtype in self.typestore.fielddefs

    def add_topic(self, topic: str, msgtype: str, qos: Sequence[Any] = ()) -> None:
        if topic in self._connections:
            return
        if not self.knows_type(msgtype):
            raise DataError(f"message type {msgtype} of {topic} is unknown to rosbags' ROS 2 Jazzy store and refinevla")
        self._connections[topic] = self._writer.add_connection(
            topic, msgtype, typestore=self.typestore, offered_qos_profiles=list(qos)
        )

    def write(self, topic: str, timestamp_ns: int, data: bytes | memoryview) -> None:
        """Store one serialized (CDR) message received at timestamp_ns."""
        self._writer.write(self._connections[topic], int(timestamp_ns), data)
        self.counts[topic] += 1

    def write_message(self, topic: str, timestamp_ns: int, msg: Any) -> None:
        """Serialize a rosbags message object and store it (tests and offline tools)."""
        self.write(topic, timestamp_ns, self.typestore.serialize_cdr(msg, msg.__msgtype__))

    def flush(self) -> None:
        """Make every message written so far survive a SIGKILL of this process."""
        store = self._writer.storage
        if store is None:
            return
        if self.storage == "sqlite3":
            store.conn.commit()
        else:
            if store.chunk.bio.tell():
                store.close_chunk()
            store.bio.flush()
            os.fsync(store.bio.fileno())

    def close(self) -> None:
        """Finish the bag (index, metadata.yaml); idempotent."""
        if not self.closed:
            self.closed = True
            self._writer.close()

    def __enter__(self) -> BagRecording:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def qos_profile(reliable: bool, transient_local: bool, depth: int = 10) -> Any:
    """A rosbags Qos entry for metadata (what `ros2 bag play` offers when replaying)."""
    from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime

    zero = QosTime(0, 0)
    return Qos(QosHistory.KEEP_LAST, depth,
               QosReliability.RELIABLE if reliable else QosReliability.BEST_EFFORT,
               QosDurability.TRANSIENT_LOCAL if transient_local else QosDurability.VOLATILE,
               zero, zero, QosLiveliness.AUTOMATIC, zero, False)


# ---- opening bags, including ones whose recorder was killed -----------------------------------------------------

_MCAP_MAGIC = b"\x89MCAP0\r\n"


def _storage_files(path: Path) -> list[Path]:
    return sorted([*path.glob("*.db3"), *path.glob("*.mcap")])


def salvage_mcap(src: Path, dst: Path) -> int:
    """Copy an mcap file that lacks its summary and footer (writer killed) up to its last complete record, then
    append a data-end record and a footer; returns how many bytes of `src` were kept. Never modifies `src`."""
    data = src.read_bytes()
    if not data.startswith(_MCAP_MAGIC):
        raise DataError(f"{src} is not an mcap file (bad magic)")
    pos, end = len(_MCAP_MAGIC), len(data)
    while pos + 9 <= end:
        op = data[pos]
        (length,) = struct.unpack_from("<Q", data, pos + 1)
        if op in (0x02, 0x0F) or pos + 9 + length > end:  # footer / data end, or a torn record
            break
        pos += 9 + length
    with dst.open("wb") as out:
        out.write(data[:pos])
        out.write(b"\x0f" + struct.pack("<QI", 4, 0))  # DataEnd(crc = 0)
        out.write(b"\x02" + struct.pack("<QQQI", 20, 0, 0, 0))  # Footer(no summary)
        out.write(_MCAP_MAGIC)
    return pos


def _salvage_sqlite(src: Path, dst: Path) -> None:
    """Copy a db3 (and any hot journal/WAL) and let SQLite roll back the uncommitted transaction in the copy."""
    shutil.copy2(src, dst)
    for suffix in ("-journal", "-wal"):
        side = src.with_name(src.name + suffix)
        if side.exists():
            shutil.copy2(side, dst.with_name(dst.name + suffix))
    conn = sqlite3.connect(dst)
    try:
        conn.execute("SELECT count(*) FROM messages").fetchone()
    except sqlite3.DatabaseError as e:
        raise DataError(f"{src}: the bag database is unreadable ({e})") from e
    finally:
        conn.close()


def _is_torn_mcap(path: Path) -> bool:
    """An mcap file that does not end with its magic bytes: the writer or a copy stopped part-way."""
    if path.suffix != ".mcap" or not path.is_file():
        return False
    if path.stat().st_size < len(_MCAP_MAGIC):
        return True
    with path.open("rb") as fh:
        fh.seek(path.stat().st_size - len(_MCAP_MAGIC))
        return fh.read() != _MCAP_MAGIC


def _truncation_hint(target: Path, error: str) -> str:
    """What to do about a bag folder whose metadata.yaml says it was closed but whose storage file is cut short."""
    files = _storage_files(target) if target.is_dir() else [target]
    torn = [f for f in files if _is_torn_mcap(f)]
    if not torn:
        damaged = [f for f in files if f.suffix == ".db3"] if "malformed" in error else []
        return (f" - {damaged[0].name} is damaged (an interrupted copy?); copy the bag again (a recording killed "
                "mid-write is read up to its last commit, but a cut SQLite file cannot be)") if damaged else ""
    return (f" - {torn[0].name} is truncated (an interrupted recording or copy?). Copy it again if you can; "
            f"otherwise convert what it holds up to its last complete record by passing the storage file itself: "
            f"`refinevla convert --bag {torn[0]} --out DATASET` (messages after the cut are lost)")


@contextlib.contextmanager
def open_bag(path: str | Path, typestore: Any | None = None) -> Iterator[tuple[Any, bool]]:
    """Open a rosbag2 folder or storage file with rosbags' AnyReader; yields (reader, recovered).

    recovered is True for a bag that was never closed (no metadata.yaml): its storage file is copied to a temp
    folder and repaired there (sqlite3: roll back the open transaction; mcap: cut at the last complete record).
    """
    from rosbags.highlevel import AnyReader, AnyReaderError

    path = Path(path)
    if not path.exists():
        raise DataError(f"bag {path} does not exist")
    store = typestore if typestore is not None else make_typestore()
    with contextlib.ExitStack() as stack:
        recovered = False
        target = path
        if path.is_dir() and not (path / "metadata.yaml").is_file():
            files = _storage_files(path)
            if len(files) != 1:
                raise DataError(
                    f"{path} has no metadata.yaml and {len(files)} storage files (*.db3 / *.mcap); "
                    "pass the bag folder written by `refinevla record` / `ros2 bag record`, or one storage file"
                )
            target = files[0]
        if target.is_file():
            if target.suffix not in (".db3", ".mcap"):
                raise DataError(f"{target}: not a rosbag2 storage file (expected .db3 or .mcap)")
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="refinevla-bag-")))
            copy = tmp / target.name
            if target.suffix == ".db3":
                recovered = path.is_dir()
                if any(target.with_name(target.name + x).exists() for x in ("-journal", "-wal")):
                    _salvage_sqlite(target, copy)  # a hot journal: roll the open transaction back in a copy
                else:
                    copy = target  # consistent as of its last commit
            else:
                with target.open("rb") as fh:
                    fh.seek(max(0, target.stat().st_size - len(_MCAP_MAGIC)))
                    complete = fh.read() == _MCAP_MAGIC
                if complete:
                    copy = target
                else:
                    salvage_mcap(target, copy)
                    recovered = True
            target = copy
        try:
            reader = AnyReader([target], default_typestore=store)
            reader.open()
        except (AnyReaderError, OSError, ValueError, KeyError) as e:
            raise DataError(f"bag {path} cannot be read: {e}{_truncation_hint(target, str(e))}") from e
        stack.callback(reader.close)
        yield reader, recovered


# ---- reading ---------------------------------------------------------------------------------------------------


@dataclass
class BagReport:
    """What a conversion read, kept, skipped and why: printed by `refinevla convert`, stored in the dataset meta."""

    bag: str = ""
    recovered: bool = False
    messages: dict[str, int] = field(default_factory=dict)
    action_type: str = ""
    actions: int = 0
    frames: int = 0
    episodes: int = 0
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> count
    dropped_bad_frames: int = 0
    dropped_short_episodes: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "bag": self.bag, "recovered": self.recovered, "messages": dict(self.messages),
            "action_type": self.action_type, "actions": self.actions, "frames": self.frames,
            "episodes": self.episodes, "skipped": dict(self.skipped), "dropped_bad_frames": self.dropped_bad_frames,
            "dropped_short_episodes": self.dropped_short_episodes, "warnings": list(self.warnings),
        }


@dataclass
class _Step:
    action: np.ndarray  # float32[7]
    image_ordinal: int
    bag_time_ns: int
    bad_image: bool = False


@dataclass
class _PlannedEpisode:
    instruction: str
    status_episode: int | None
    steps: list[_Step] = field(default_factory=list)
    success: bool | None = None
    seed: int | None = None
    task: str = ""


class BagEpisodeReader:
    """Turn one bag into Episodes: `for ep in BagEpisodeReader(path, cfg).episodes(): ...`; `.report` fills as it
    goes. Two passes over the bag: the first reads the small topics and image times and plans every frame (so bad
    actions fail before any image is decoded), the second decodes only the images the frames use."""

    def __init__(self, path: str | Path, config: BagTopicsConfig | None = None, drop_bad_frames: bool = False,
                 typestore: Any | None = None) -> None:
        self.path = Path(path)
        self.config = config or BagTopicsConfig()
        self.drop_bad_frames = drop_bad_frames
        self.typestore = typestore
        self.report = BagReport(bag=str(self.path))

    # -- pass 1 ----------------------------------------------------------------------------------------------------
    def _topics(self, reader: Any) -> dict[str, Any]:
        cfg = self.config
        by_topic: dict[str, list[Any]] = {}
        for c in reader.connections:
            by_topic.setdefault(c.topic, []).append(c)
        available = ", ".join(f"{t} [{cs[0].msgtype}]" for t, cs in sorted(by_topic.items())) or "none"

        def pick(topic: str, allowed: tuple[str, ...], key: str, required: bool) -> Any | None:
            conns = by_topic.get(topic, []) if topic else []
            if not conns:
                if required:
                    raise DataError(
                        f"bag {self.path} has no {topic!r} topic (config key {key}); its topics: {available}"
                    )
                return None
            types = {c.msgtype for c in conns}
            if len(types) != 1 or next(iter(types)) not in allowed:
                raise DataError(
                    f"bag {self.path}: {topic} has type {sorted(types)}; {key} must be one of {list(allowed)}"
                )
            self.report.messages[topic] = sum(c.msgcount for c in conns)
            return conns

        return {
            "image": pick(cfg.image_topic, IMAGE_TYPES, "image_topic", True),
            "action": pick(cfg.action_topic, ACTION_TYPES, "action_topic", True),
            "gripper": pick(cfg.gripper_topic, GRIPPER_TYPES, "gripper_topic", False),
            "instruction": pick(cfg.instruction_topic, INSTRUCTION_TYPES, "instruction_topic", False),
            "status": pick(cfg.episode_status_topic, STATUS_TYPES, "episode_status_topic", False),
        }

    def _plan(self, reader: Any, conns: dict[str, Any]) -> list[_PlannedEpisode]:
        cfg = self.config
        use_header = cfg.time_source == "header"
        topic_of = {cs[0].topic: name for name, cs in conns.items() if cs}
        image_times: list[int] = []
        instructions: list[tuple[int, str]] = []
        grippers: list[tuple[int, float]] = []
        statuses: list[tuple[int, Any]] = []
        actions: list[tuple[int, int, Any]] = []  # (bag time, pairing time, msg)
        wanted = [c for cs in conns.values() if cs for c in cs]
        empty_instructions = 0
        for conn, t, raw in reader.messages(connections=wanted):
            kind = topic_of[conn.topic]
            msg = reader.deserialize(raw, conn.msgtype)
            if kind == "image":
                image_times.append(self._pair_time(msg, t, conn.topic) if use_header else t)
            elif kind == "action":
                actions.append((t, self._pair_time(msg, t, conn.topic) if use_header else t, msg))
                self.report.action_type = conn.msgtype
            elif kind == "gripper":
                grippers.append((t, float(msg.data)))
            elif kind == "instruction":
                text = " ".join(str(msg.data).split())
                if text:
                    instructions.append((t, text))
                else:
                    empty_instructions += 1
            elif kind == "status":
                statuses.append((t, msg))
        if empty_instructions:
            self.report.warnings.append(f"{empty_instructions} empty instruction message(s) ignored")
        self.report.actions = len(actions)
        if not instructions and cfg.default_instruction:
            instructions = [(-1, " ".join(cfg.default_instruction.split()))]
        if not instructions:
            raise DataError(
                f"bag {self.path} has no instruction messages on {cfg.instruction_topic!r}; record the instruction "
                "topic, or set default_instruction in the bag config (e.g. --set default_instruction='put the "
                "spoon on the towel')"
            )

        order = sorted(range(len(image_times)), key=image_times.__getitem__)
        sorted_image_times = [image_times[i] for i in order]
        instr_times = [t for t, _ in instructions]
        grip_times = [t for t, _ in grippers]
        status_times = [t for t, _ in statuses]
        slack = int(cfg.gripper_slack_s * 1e9)
        max_age = int(cfg.max_image_age_s * 1e9)
        max_gap = int(cfg.max_gap_s * 1e9)

        episodes: list[_PlannedEpisode] = []
        current: _PlannedEpisode | None = None
        prev_t: int | None = None
        for n, (t, t_pair, msg) in enumerate(actions):
            gap = prev_t is not None and t - prev_t > max_gap
            prev_t = t
            i = bisect.bisect_right(instr_times, t) - 1
            if i < 0:
                self.report.skipped["before_first_instruction"] += 1
                continue
            instruction = instructions[i][1]
            j = bisect.bisect_right(status_times, t) - 1
            status = statuses[j][1] if j >= 0 else None
            status_episode = int(status.episode) if status is not None else None
            if current is None or gap or instruction != current.instruction or status_episode != current.status_episode:
                current = _PlannedEpisode(instruction, status_episode)
                episodes.append(current)
            if status is not None:
                current.seed = int(status.seed)
                current.task = str(status.task)
            if getattr(msg, "safe_hold", False) and cfg.skip_safe_hold:
                self.report.skipped["safe_hold"] += 1
                continue
            delta = msg.delta if hasattr(msg, "delta") else msg
            if hasattr(msg, "gripper"):
                gripper = float(msg.gripper)
            else:
                g = bisect.bisect_right(grip_times, t + slack) - 1
                if g >= 0:
                    gripper = grippers[g][1]
                elif cfg.initial_gripper is not None:
                    gripper = cfg.initial_gripper
                else:
                    raise DataError(
                        f"bag {self.path} action {n} (t={t / 1e9:.3f} s) has no gripper value: no "
                        f"{cfg.gripper_topic!r} message before it; record the gripper topic, or set initial_gripper "
                        "in the bag config (1.0 = open, 0.0 = closed; e.g. --set initial_gripper=1.0)"
                    )
            action = np.array([delta.x, delta.y, delta.z, delta.roll, delta.pitch, delta.yaw, gripper], np.float64)
            where = (f"bag {self.path} episode {len(episodes) - 1} frame {len(current.steps)} "
                     f"(action message {n}, t={t / 1e9:.3f} s)")
            if not np.all(np.isfinite(action)):
                if self.drop_bad_frames:
                    self.report.dropped_bad_frames += 1
                    continue
                raise DataError(
                    f"{where}: non-finite action {action.tolist()}; fix the publisher, or pass --drop-bad-frames to "
                    "drop such frames (they are counted in the summary)"
                )
            if not -1e-6 <= gripper <= 1 + 1e-6:
                raise DataError(
                    f"{where}: gripper {gripper} is outside [0, 1]; {cfg.gripper_topic} must use the Bridge convention "
                    "(1 = open, 0 = closed). SimplerEnv's -1..+1 converts with g = (g_sim + 1) / 2"
                )
            k = bisect.bisect_right(sorted_image_times, t_pair) - 1
            if k < 0:
                self.report.skipped["before_first_image"] += 1
                continue
            if t_pair - sorted_image_times[k] > max_age:
                self.report.skipped["stale_image"] += 1
                continue
            current.steps.append(_Step(action.astype(np.float32), order[k], t))

        kept = []
        for ep in episodes:
            if not ep.steps:
                continue
            if len(ep.steps) < cfg.min_episode_frames:
                self.report.dropped_short_episodes += 1
                continue
            kept.append(ep)
        if statuses:
            for ep in kept:
                seen = [s for s in (m for _, m in statuses) if int(s.episode) == ep.status_episode]
                ep.success = any(bool(s.ever_success) for s in seen) if seen else None
        return kept

    def _pair_time(self, msg: Any, bag_time: int, topic: str) -> int:
        t = stamp_ns(msg.header)
        if t == 0:
            raise DataError(
                f"bag {self.path}: a {topic} message has a zero header stamp, so time_source: header cannot pair it; "
                "stamp the messages, or use time_source: bag"
            )
        return t

    # -- pass 2 ----------------------------------------------------------------------------------------------------
    def episodes(self) -> Iterator[Episode]:
        """Yield the bag's episodes in time order (each validated); fills self.report."""
        cfg = self.config
        with open_bag(self.path, self.typestore) as (reader, recovered):
            self.report.recovered = recovered
            if recovered:
                self.report.warnings.append(
                    "the bag was not closed (recorder killed?): read up to its last flush"
                )
            conns = self._topics(reader)
            planned = self._plan(reader, conns)
            if not planned:
                return
            needed: dict[int, list[tuple[int, int]]] = {}  # image ordinal -> [(episode, step)]
            for e, ep in enumerate(planned):
                for s, step in enumerate(ep.steps):
                    needed.setdefault(step.image_ordinal, []).append((e, s))
            last_needed = max(needed)
            images: dict[tuple[int, int], np.ndarray] = {}
            remaining = [len(ep.steps) for ep in planned]
            next_out = 0
            for ordinal, (conn, _t, raw) in enumerate(reader.messages(connections=conns["image"])):
                if ordinal > last_needed:
                    break
                users = needed.get(ordinal)
                if not users:
                    continue
                msg = reader.deserialize(raw, conn.msgtype)
                try:
                    rgb = resize_rgb(image_msg_to_rgb(msg, conn.msgtype), cfg.image_size)
                except ValueError as e:
                    e0, s0 = users[0]
                    if not self.drop_bad_frames:
                        raise DataError(
                            f"bag {self.path} episode {e0} frame {s0}: {cfg.image_topic}: {e}; pass --drop-bad-frames "
                            "to drop frames with undecodable images"
                        ) from e
                    rgb = None
                for e, s in users:
                    if rgb is None:
                        planned[e].steps[s].bad_image = True
                        self.report.dropped_bad_frames += 1
                    else:
                        images[(e, s)] = rgb
                    remaining[e] -= 1
                while next_out < len(planned) and remaining[next_out] == 0:
                    episode = self._assemble(next_out, planned[next_out], images)
                    if episode is not None:
                        yield episode
                    next_out += 1
            if next_out < len(planned):
                raise DataError(f"bag {self.path}: image messages ended early (is the storage file truncated?)")

    def _assemble(self, e: int, ep: _PlannedEpisode, images: dict[tuple[int, int], np.ndarray]) -> Episode | None:
        keep = [s for s, step in enumerate(ep.steps) if not step.bad_image]
        frames = [images.pop((e, s)) for s in keep]
        if len(keep) < self.config.min_episode_frames:
            self.report.dropped_short_episodes += 1
            return None
        shapes = {f.shape for f in frames}
        if len(shapes) != 1:
            first = frames[0].shape
            odd = next(i for i, f in enumerate(frames) if f.shape != first)
            raise DataError(
                f"bag {self.path} episode {e} frame {odd}: image size {frames[odd].shape[:2]} differs from "
                f"{first[:2]} earlier in the episode; set image_size: [height, width] in the bag config to resize"
            )
        steps = [ep.steps[s] for s in keep]
        episode = Episode(
            images=np.stack(frames), actions=np.stack([s.action for s in steps]), instruction=ep.instruction,
            task=ep.task or self.config.task, success=ep.success, seed=ep.seed,
            metadata={
                "source": "rosbag", "bag": str(self.path), "bag_episode": e,
                "start_time_ns": steps[0].bag_time_ns, "end_time_ns": steps[-1].bag_time_ns,
                "image_topic": self.config.image_topic, "action_topic": self.config.action_topic,
                "time_source": self.config.time_source,
            },
        )
        episode.validate(where=f"bag {self.path} episode {e}")
        self.report.episodes += 1
        self.report.frames += len(episode)
        return episode


def read_bag(path: str | Path, config: BagTopicsConfig | None = None, drop_bad_frames: bool = False
             ) -> tuple[list[Episode], BagReport]:
    """All episodes of a bag in memory (small bags, tests); use BagEpisodeReader to stream large ones."""
    reader = BagEpisodeReader(path, config, drop_bad_frames)
    episodes = list(reader.episodes())
    return episodes, reader.report
