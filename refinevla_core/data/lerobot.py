"""LeRobot-format datasets <-> Episodes, so public robot data (e.g. BridgeData V2 in LeRobot form) and LeRobot
recordings train ReFineVLA without a detour through the `lerobot` package (pyarrow + PyAV only).

Supported layouts (meta/info.json "codebase_version"):

- v2.0 / v2.1: one parquet and one mp4 per episode,
  data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet,
  videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4, meta/episodes.jsonl,
  meta/tasks.jsonl.
- v3.0: many episodes per file, data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet,
  videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4; meta/episodes/*/*.parquet gives each episode's
  files and its video span (videos/{key}/from_timestamp); meta/tasks.parquet maps task text to task_index.

Frame images are either "video" features (mp4, decoded with PyAV at from_timestamp + timestamp) or "image" features
(PNG/JPEG bytes stored in the parquet). The instruction of a frame is the text of its task_index; an episode whose task
changes part-way is split there, since an Episode has one instruction.

The action layout refinevla trains on is 7-D (dx, dy, dz, droll, dpitch, dyaw, gripper): end-effector deltas in
metres/radians and an absolute gripper, 1 = open, 0 = closed (BridgeData V2). The reader checks the action feature:
7 values whose declared names read as x, y, z, roll, pitch, yaw, gripper (e.g. Bridge's ["x", "y", "z", "roll",
"pitch", "yaw", "gripper"]); joint-space actions (names such as "shoulder_pan.pos") or any other width are refused
with a DataError, since feeding joint targets as EE deltas would teach the model nonsense. Datasets that do not
declare names, or name them unusually, are read with `assume_action_layout: true` once a human has checked the order.
`gripper_convention` converts -1..+1 (SimplerEnv/Octo) or 1 = closed datasets to Bridge; gripper values that end up
outside [0, 1] are an error naming the conventions to try.

Gripper conventions and their converters are refinevla_core.gripper. The tests build small LeRobot datasets with a
writer of the same layouts (test/core/lerobot_writer.py); it follows LeRobot's published layout and is not checked
against the `lerobot` package itself, which is not installed here.
"""

from __future__ import annotations

import io
import itertools
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from refinevla_core.data.episode import ACTION_DIM, DataError, Episode
from refinevla_core.data.images import resize_rgb
from refinevla_core.gripper import GripperConvention, to_bridge

SUPPORTED_VERSIONS = ("v2.0", "v2.1", "v3.0")
BRIDGE_ACTION_NAMES = ("x", "y", "z", "roll", "pitch", "yaw", "gripper")
_JOINT_HINTS = ("joint", "shoulder", "elbow", "wrist", "waist", "forearm", ".pos", "_pos", "motor")


@dataclass
class LeRobotConfig:
    """How a LeRobot dataset maps onto refinevla frames (CLI: refinevla convert --lerobot PATH --set key=value)."""

    image_key: str | None = None  # the 3rd-person camera, e.g. observation.images.image_0; None: the only camera
    action_key: str = "action"
    gripper_convention: GripperConvention = "bridge"  # bridge: 1 open / 0 closed; plus_minus_one: -1 closed / +1 open
    assume_action_layout: bool = False  # accept undeclared/unusual action names as (dx..dyaw, gripper) in that order
    image_size: list[int] | None = None  # [height, width] to resize to; None keeps the dataset's size
    episodes: list[int] | None = None  # only these episode indices; None: all
    task: str = ""  # Episode.task for converted episodes

    def __post_init__(self) -> None:
        if self.image_size is not None and (len(self.image_size) != 2 or min(self.image_size) <= 0):
            raise ValueError(f"image_size must be [height, width] with positive values; got {self.image_size}")


def _flat_names(names: Any) -> list[str] | None:
    """LeRobot "names" is a list, a {"motors": [...]} dict, or null."""
    if names is None:
        return None
    if isinstance(names, dict):
        flat = [str(n) for v in names.values() for n in (v if isinstance(v, list) else [v])]
        return flat or None
    if isinstance(names, list):
        return [str(n) for n in names]
    return None


def _canonical_action_name(name: str) -> str:
    n = re.sub(r"[^a-z]", "", name.lower())
    for token in ("delta", "eef", "ee", "action", "world", "translation", "rotation", "rot", "pos", "cartesian"):
        n = n.replace(token, "")
    if "grip" in n:
        return "gripper"
    if n.startswith("d") and n[1:] in BRIDGE_ACTION_NAMES:
        n = n[1:]
    return n


def check_action_layout(feature: dict[str, Any], key: str, where: str, assume_layout: bool) -> None:
    """Raise DataError unless `feature` is a 7-D EE-delta + gripper action (see the module docstring)."""
    shape = list(feature.get("shape") or [])
    if shape != [ACTION_DIM]:
        raise DataError(
            f"{where}: feature {key!r} has shape {shape}; refinevla trains on 7-D actions (dx, dy, dz, droll, dpitch, "
            "dyaw, gripper: end-effector deltas + absolute gripper). Convert other action spaces (joint positions, "
            "absolute poses, bimanual) to EE deltas first, or pick another action_key"
        )
    names = _flat_names(feature.get("names"))
    if declares_bridge_action_names(names) or assume_layout:
        return
    if names is None:
        raise DataError(
            f"{where}: feature {key!r} declares no names, so its layout cannot be checked; if it is (dx, dy, dz, "
            "droll, dpitch, dyaw, gripper) in that order, set assume_action_layout: true"
        )
    looks_joint = any(h in n.lower() for n in names for h in _JOINT_HINTS)
    kind = "joint-space " if looks_joint else ""
    raise DataError(
        f"{where}: feature {key!r} names {names} do not read as end-effector deltas (x, y, z, roll, pitch, yaw, "
        f"gripper); refinevla cannot train on {kind}actions like these. Convert them to EE deltas first, or, if they "
        "really are (dx, dy, dz, droll, dpitch, dyaw, gripper) in that order, set assume_action_layout: true"
    )


def declares_bridge_action_names(names: list[str] | None) -> bool:
    return names is not None and [_canonical_action_name(n) for n in names] == list(BRIDGE_ACTION_NAMES)


# ---- reading ---------------------------------------------------------------------------------------------------


@dataclass
class LeRobotReport:
    dataset: str = ""
    version: str = ""
    image_key: str = ""
    episodes_read: int = 0
    episodes: int = 0
    frames: int = 0
    split_at_task_change: int = 0
    dropped_bad_frames: int = 0
    dropped_short_episodes: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__, warnings=list(self.warnings))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e})") from e
    return rows


def _read_parquet(path: Path, columns: Sequence[str] | None = None) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DataError(f"{path} is missing: the LeRobot dataset is incomplete")
    try:
        return pq.read_table(path, columns=list(columns) if columns else None)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path} is not a readable parquet file ({e})") from e


def _column_array(table: Any, name: str, where: str) -> np.ndarray:
    """A list/fixed-size-list column -> (N, D) float64; a scalar column -> (N,)."""
    import pyarrow as pa

    if name not in table.column_names:
        raise DataError(f"{where}: column {name!r} is missing; it has {table.column_names}")
    col = table.column(name).combine_chunks()
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type):
        if col.null_count:
            raise DataError(f"{where}: column {name!r} has {col.null_count} null rows")
        lengths = {len(v) for v in col.to_pylist()} if not pa.types.is_fixed_size_list(col.type) else None
        if lengths is not None and len(lengths) > 1:
            raise DataError(f"{where}: column {name!r} rows have different lengths {sorted(lengths)}")
        flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
        return flat.reshape(len(col), -1)
    return col.to_numpy(zero_copy_only=False)


class LeRobotReader:
    """Read a local LeRobot dataset folder as Episodes: `for ep in LeRobotReader(root, cfg).episodes(): ...`; an
    EpisodeSource (refinevla_core.data.source) for `refinevla convert`."""

    def __init__(self, root: str | Path, config: LeRobotConfig | None = None, drop_bad_frames: bool = False) -> None:
        self.root = Path(root)
        self.config = config or LeRobotConfig()
        self.drop_bad_frames = drop_bad_frames  # the default of read_episode / episodes
        info_path = self.root / "meta" / "info.json"
        if not info_path.is_file():
            raise DataError(
                f"{self.root} is not a LeRobot dataset (no meta/info.json); pass the dataset folder (the one holding "
                "meta/, data/ and videos/). Hub datasets must be downloaded first (huggingface-cli download "
                "--repo-type dataset NAME --local-dir DIR)"
            )
        try:
            self.info: dict[str, Any] = json.loads(info_path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{info_path} is not valid JSON ({e})") from e
        self.version = str(self.info.get("codebase_version", ""))
        if self.version not in SUPPORTED_VERSIONS:
            raise DataError(
                f"{info_path}: codebase_version {self.version!r} is not supported (supported: "
                f"{', '.join(SUPPORTED_VERSIONS)}); convert it with LeRobot's conversion scripts first"
            )
        self.fps = float(self.info.get("fps") or 0)
        if self.fps <= 0:
            raise DataError(f"{info_path}: fps is missing or not positive")
        self.features: dict[str, dict[str, Any]] = self.info.get("features") or {}
        where = str(info_path)
        cfg = self.config
        if cfg.action_key not in self.features:
            raise DataError(f"{where}: no feature {cfg.action_key!r} (action_key); features: {sorted(self.features)}")
        check_action_layout(self.features[cfg.action_key], cfg.action_key, where, cfg.assume_action_layout)
        self.camera_keys = [k for k, f in self.features.items() if f.get("dtype") in ("video", "image")]
        if cfg.image_key is not None:
            if cfg.image_key not in self.camera_keys:
                raise DataError(f"{where}: image_key {cfg.image_key!r} is not a camera; cameras: {self.camera_keys}")
            self.image_key = cfg.image_key
        elif len(self.camera_keys) == 1:
            self.image_key = self.camera_keys[0]
        else:
            raise DataError(
                f"{where}: the dataset has {len(self.camera_keys)} cameras {self.camera_keys}; choose the "
                "3rd-person one with image_key (e.g. --set image_key=" + (self.camera_keys or ["..."])[0] + ")"
            )
        self.image_dtype = self.features[self.image_key]["dtype"]
        self.tasks = self._load_tasks()
        self.episode_rows = self._load_episode_rows()
        self.report = LeRobotReport(dataset=str(self.root), version=self.version, image_key=self.image_key)
        self._table_cache: tuple[Path, Any] | None = None

    # -- metadata ----------------------------------------------------------------------------------------------
    @property
    def is_v3(self) -> bool:
        return self.version.startswith("v3")

    def _load_tasks(self) -> dict[int, str]:
        if self.is_v3:
            path = self.root / "meta" / "tasks.parquet"
            table = _read_parquet(path)
            cols = table.column_names
            text_col = "task" if "task" in cols else ("__index_level_0__" if "__index_level_0__" in cols else None)
            if "task_index" not in cols or text_col is None:
                raise DataError(f"{path}: expected columns task_index and task; got {cols}")
            return {int(i): str(t) for i, t in zip(table.column("task_index").to_pylist(),
                                                   table.column(text_col).to_pylist(), strict=True)}
        path = self.root / "meta" / "tasks.jsonl"
        if not path.is_file():
            raise DataError(f"{path} is missing: the LeRobot dataset has no task (instruction) table")
        return {int(r["task_index"]): str(r["task"]) for r in _read_jsonl(path)}

    def _load_episode_rows(self) -> dict[int, dict[str, Any]]:
        if self.is_v3:
            files = sorted((self.root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
            if not files:
                raise DataError(f"{self.root}/meta/episodes has no chunk-*/file-*.parquet: the dataset is incomplete")
            rows: dict[int, dict[str, Any]] = {}
            for f in files:
                table = _read_parquet(f)
                keep = [c for c in table.column_names if not c.startswith("stats/")]
                for row in table.select(keep).to_pylist():
                    rows[int(row["episode_index"])] = row
            return dict(sorted(rows.items()))
        path = self.root / "meta" / "episodes.jsonl"
        if not path.is_file():
            raise DataError(f"{path} is missing: the LeRobot dataset is incomplete")
        return {int(r["episode_index"]): r for r in _read_jsonl(path)}

    def episode_indices(self) -> list[int]:
        wanted = self.config.episodes
        if wanted is None:
            return list(self.episode_rows)
        missing = sorted(set(wanted) - set(self.episode_rows))
        if missing:
            raise DataError(f"{self.root}: episodes {missing} do not exist (it has {len(self.episode_rows)})")
        return list(wanted)

    # -- data --------------------------------------------------------------------------------------------------
    def _data_path(self, index: int) -> Path:
        template = self.info.get("data_path")
        if not template:
            raise DataError(f"{self.root}/meta/info.json has no data_path")
        if self.is_v3:
            row = self.episode_rows[index]
            return self.root / template.format(chunk_index=int(row["data/chunk_index"]),
                                               file_index=int(row["data/file_index"]))
        chunk = index // int(self.info.get("chunks_size") or 1000)
        return self.root / template.format(episode_chunk=chunk, episode_index=index)

    def _video_path(self, index: int) -> tuple[Path, float]:
        template = self.info.get("video_path")
        if not template:
            raise DataError(f"{self.root}/meta/info.json has no video_path but {self.image_key} is a video feature")
        key = self.image_key
        if self.is_v3:
            row = self.episode_rows[index]
            try:
                path = template.format(video_key=key, chunk_index=int(row[f"videos/{key}/chunk_index"]),
                                       file_index=int(row[f"videos/{key}/file_index"]))
                return self.root / path, float(row[f"videos/{key}/from_timestamp"])
            except KeyError as e:
                raise DataError(f"{self.root}: episode {index} metadata lacks {e} for camera {key}") from e
        chunk = index // int(self.info.get("chunks_size") or 1000)
        return self.root / template.format(episode_chunk=chunk, video_key=key, episode_index=index), 0.0

    def _episode_table(self, index: int) -> Any:
        import pyarrow.compute as pc

        path = self._data_path(index)
        if self._table_cache is None or self._table_cache[0] != path:
            self._table_cache = (path, _read_parquet(path))
        table = self._table_cache[1]
        if "episode_index" in table.column_names:
            table = table.filter(pc.equal(table.column("episode_index"), index))
        if "frame_index" in table.column_names:
            table = table.sort_by("frame_index")
        if table.num_rows == 0:
            raise DataError(f"{path} has no rows for episode {index}")
        return table

    def _images(self, index: int, table: Any, where: str) -> list[np.ndarray]:
        if self.image_dtype == "image":
            from PIL import Image as PILImage

            out = []
            for i, cell in enumerate(table.column(self.image_key).to_pylist()):
                data = cell.get("bytes") if isinstance(cell, dict) else cell
                if not data and isinstance(cell, dict) and cell.get("path"):
                    data = (self.root / cell["path"]).read_bytes()
                try:
                    with PILImage.open(io.BytesIO(data)) as im:
                        out.append(np.asarray(im.convert("RGB")).copy())
                except Exception as e:  # PIL raises many types for corrupt data
                    raise DataError(f"{where} frame {i}: image {self.image_key!r} cannot be decoded ({e})") from e
            return out
        path, offset = self._video_path(index)
        timestamps = _column_array(table, "timestamp", where).astype(np.float64).reshape(-1)
        return decode_video_frames(path, offset + timestamps, tolerance_s=0.45 / self.fps, where=where)

    def read_episode(self, index: int, drop_bad_frames: bool | None = None) -> list[Episode]:
        """Episode `index` as one Episode, or several where its task changes; non-finite actions raise DataError
        naming the episode and frame, or are dropped and counted with drop_bad_frames (None: the reader's)."""
        if drop_bad_frames is None:
            drop_bad_frames = self.drop_bad_frames
        where = f"{self.root} episode {index}"
        table = self._episode_table(index)
        actions, bad = self._bridge_actions(table, where, drop_bad_frames)
        task_idx = self._task_indices(index, table, where)
        images = self._images(index, table, where)
        if len(images) != len(actions):
            raise DataError(f"{where}: {len(images)} images for {len(actions)} actions")
        self.report.episodes_read += 1
        self.report.dropped_bad_frames += int(bad.sum())
        pieces: list[Episode] = []
        n = len(actions)
        task_changes = [i for i in range(1, n) if task_idx[i] != task_idx[i - 1]]
        for start, end in itertools.pairwise([0, *task_changes, n]):
            keep = [i for i in range(start, end) if not bad[i]]
            if not keep:
                self.report.dropped_short_episodes += 1
                continue
            frames = [resize_rgb(images[i], self.config.image_size) for i in keep]
            if len({f.shape for f in frames}) != 1:
                raise DataError(f"{where}: image sizes differ within the episode; set image_size: [height, width]")
            episode = Episode(
                images=np.stack(frames), actions=actions[keep].astype(np.float32),
                instruction=self.tasks[int(task_idx[start])], task=self.config.task,
                metadata={"source": "lerobot", "dataset": str(self.root), "lerobot_episode": index,
                          "first_frame": start, "image_key": self.image_key, "fps": self.fps},
            )
            episode.validate(where=f"{where} frames {start}..{end - 1}")
            pieces.append(episode)
        self.report.split_at_task_change += max(0, len(pieces) - 1)
        self.report.episodes += len(pieces)
        self.report.frames += sum(len(p) for p in pieces)
        return pieces

    def _bridge_actions(self, table: Any, where: str, drop_bad_frames: bool) -> tuple[np.ndarray, np.ndarray]:
        """(actions (N, 7) float64 with the gripper in Bridge's [0, 1], mask of non-finite rows); DataError for a
        non-finite row unless drop_bad_frames, and for gripper values the configured convention does not explain."""
        cfg = self.config
        actions = _column_array(table, cfg.action_key, where)
        if actions.ndim != 2 or actions.shape[1] != ACTION_DIM:
            raise DataError(f"{where}: {cfg.action_key!r} rows have {actions.shape[1:]} values, expected {ACTION_DIM}")
        actions = actions.copy()
        bad = ~np.isfinite(actions).all(axis=1)
        if bad.any() and not drop_bad_frames:
            frame = int(np.argmax(bad))
            raise DataError(
                f"{where} frame {frame}: non-finite action {actions[frame].tolist()}; {int(bad.sum())} frame(s) "
                "affected. Fix the dataset, or pass --drop-bad-frames to drop them (they are counted)"
            )
        actions[:, 6] = to_bridge(actions[:, 6], cfg.gripper_convention)
        grip = actions[~bad, 6]
        if grip.size and (grip.min() < -1e-3 or grip.max() > 1 + 1e-3):
            raise DataError(
                f"{where}: gripper values span [{grip.min():.3f}, {grip.max():.3f}] after the "
                f"{cfg.gripper_convention!r} conversion, outside Bridge's [0, 1] (1 = open). Set "
                "gripper_convention: plus_minus_one for -1..+1 data, closed_is_one for 1 = closed data"
            )
        actions[:, 6] = np.clip(actions[:, 6], 0.0, 1.0)
        return actions, bad

    def _task_indices(self, index: int, table: Any, where: str) -> np.ndarray:
        if "task_index" in table.column_names:
            idx = _column_array(table, "task_index", where).astype(np.int64).reshape(-1)
        else:
            tasks = self.episode_rows[index].get("tasks") or []
            if not tasks:
                raise DataError(f"{where}: no task_index column and no tasks in the episode metadata")
            by_text = {t: i for i, t in self.tasks.items()}
            if tasks[0] not in by_text:
                raise DataError(f"{where}: task {tasks[0]!r} is not in the task table")
            idx = np.full(table.num_rows, by_text[tasks[0]], np.int64)
        unknown = sorted(set(idx.tolist()) - set(self.tasks))
        if unknown:
            raise DataError(f"{where}: task_index {unknown} not in the task table ({len(self.tasks)} tasks)")
        empty = [i for i in set(idx.tolist()) if not self.tasks[i].strip()]
        if empty:
            raise DataError(f"{where}: task {empty[0]} is empty: frames need a language instruction")
        return idx

    def episodes(self, drop_bad_frames: bool | None = None) -> Iterator[Episode]:
        for index in self.episode_indices():
            yield from self.read_episode(index, drop_bad_frames)

    def expected_episodes(self) -> int:
        """EpisodeSource: how many source episodes source_episodes() goes through."""
        return len(self.episode_indices())

    def source_episodes(self) -> Iterator[list[Episode]]:
        """EpisodeSource: per dataset episode, the Episodes it became (several where its task changes)."""
        for index in self.episode_indices():
            yield self.read_episode(index)


def decode_video_frames(path: Path, timestamps: np.ndarray, tolerance_s: float, where: str = "") -> list[np.ndarray]:
    """Frames of an mp4 at the given times (seconds), nearest frame within tolerance_s, as HxWx3 uint8 RGB."""
    import av

    if not path.is_file():
        raise DataError(f"{where}: video {path} is missing")
    if len(timestamps) == 0:
        return []
    first, last = float(np.min(timestamps)), float(np.max(timestamps))
    times: list[float] = []
    frames: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            container.seek(max(0, int(first / stream.time_base)), stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                t = float(frame.time)
                if t < first - tolerance_s:
                    continue
                if t > last + tolerance_s:
                    break
                times.append(t)
                frames.append(frame.to_ndarray(format="rgb24"))
    except (av.error.FFmpegError, IndexError) as e:
        raise DataError(f"{where}: video {path} cannot be decoded ({e})") from e
    if not frames:
        raise DataError(f"{where}: video {path} has no frames between {first:.3f} s and {last:.3f} s")
    t_arr = np.asarray(times)
    out = []
    for i, ts in enumerate(timestamps):
        j = int(np.argmin(np.abs(t_arr - ts)))
        if abs(t_arr[j] - ts) > tolerance_s:
            raise DataError(
                f"{where} frame {i}: no video frame within {tolerance_s * 1000:.0f} ms of t={ts:.3f} s in {path} "
                f"(nearest {t_arr[j]:.3f} s); the video and the parquet timestamps disagree"
            )
        out.append(frames[j])
    return out
