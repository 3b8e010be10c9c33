"""How ROS 2 bags are stored: refinevla's message types for rosbags, the writer behind `refinevla record`, and
opening a bag for reading, including one whose recorder was killed.

Everything here uses rosbags (sqlite3 and mcap storage, no ROS install needed), so bags are written by the recorder
node and read on a training server without ROS. A bag whose recorder was killed (no metadata.yaml) is still read:
sqlite3 storage up to its last commit, mcap up to its last complete record (`open_bag`); BagRecording.flush() is what
puts data there. refinevla_core.data.bag_reader turns an opened bag into Episodes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import struct
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from refinevla_core.data.episode import DataError

# ---- message types ---------------------------------------------------------------------------------------------

PACKAGE = "refinevla"


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
        target = _storage_file_of_unclosed_bag(path) or path
        if target.is_file():
            if target.suffix not in (".db3", ".mcap"):
                raise DataError(f"{target}: not a rosbag2 storage file (expected .db3 or .mcap)")
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="refinevla-bag-")))
            target, recovered = _readable_storage_file(target, tmp / target.name, in_folder=path.is_dir())
        try:
            reader = AnyReader([target], default_typestore=store)
            reader.open()
        except (AnyReaderError, OSError, ValueError, KeyError) as e:
            raise DataError(f"bag {path} cannot be read: {e}{_truncation_hint(target, str(e))}") from e
        stack.callback(reader.close)
        yield reader, recovered


def _storage_file_of_unclosed_bag(path: Path) -> Path | None:
    """The one storage file of a bag folder without metadata.yaml (its recorder never closed it); None for a closed
    bag folder or a storage file given directly."""
    if not path.is_dir() or (path / "metadata.yaml").is_file():
        return None
    files = _storage_files(path)
    if len(files) != 1:
        raise DataError(
            f"{path} has no metadata.yaml and {len(files)} storage files (*.db3 / *.mcap); "
            "pass the bag folder written by `refinevla record` / `ros2 bag record`, or one storage file"
        )
    return files[0]


def _readable_storage_file(target: Path, copy: Path, in_folder: bool) -> tuple[Path, bool]:
    """(a storage file rosbags can read, recovered): `target` itself when it is consistent, else a repaired copy at
    `copy`. A db3 is consistent as of its last commit unless a hot journal is left; an mcap when it ends with its
    magic bytes. `in_folder`: the file came from a bag folder without metadata.yaml, so it was never closed."""
    if target.suffix == ".db3":
        if any(target.with_name(target.name + x).exists() for x in ("-journal", "-wal")):
            _salvage_sqlite(target, copy)  # a hot journal: roll the open transaction back in a copy
            return copy, in_folder
        return target, in_folder
    with target.open("rb") as fh:
        fh.seek(max(0, target.stat().st_size - len(_MCAP_MAGIC)))
        complete = fh.read() == _MCAP_MAGIC
    if complete:
        return target, False
    salvage_mcap(target, copy)
    return copy, True
