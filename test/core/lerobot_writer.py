"""A LeRobot dataset writer for the tests: Episodes -> the v2.1 or v3.0 layout LeRobotReader reads
(refinevla_core.data.lerobot), with pyarrow and PyAV, so tests build small LeRobot datasets honestly.

It follows LeRobot's published layout; it is not checked against the `lerobot` package itself, which is not
installed here. Test support only: refinevla reads LeRobot data and never needs to write it.
"""

from __future__ import annotations

import fractions
import io
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image as PILImage

from refinevla_core.data.episode import ACTION_DIM, DataError, Episode
from refinevla_core.data.lerobot import BRIDGE_ACTION_NAMES
from refinevla_core.gripper import GripperConvention, from_bridge
from refinevla_core.io import folder_built_in_place_of

V21_DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
V21_VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
V30_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V30_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"


def write_lerobot_dataset(
    root: str | Path,
    episodes: Iterable[Episode],
    *,
    fps: float = 5.0,
    version: Literal["v2.1", "v3.0"] = "v3.0",
    image_key: str = "observation.images.image_0",
    image_storage: Literal["video", "image"] = "video",
    codec: str = "libx264",
    gripper_convention: GripperConvention = "bridge",
    robot_type: str = "widowx",
) -> Path:
    """Write Episodes as a LeRobot dataset (v2.1: a file per episode; v3.0: all episodes in one file per kind).

    Actions are written with Bridge names (x, y, z, roll, pitch, yaw, gripper), the gripper in `gripper_convention`.
    The folder must not exist; it is built under a temp name and renamed into place at the end.
    """
    root = Path(root)
    if root.exists():
        raise DataError(f"{root} already exists; choose a new folder for the LeRobot dataset")
    with folder_built_in_place_of(root, root.with_name(f".{root.name}.writing")) as tmp:
        eps = list(episodes)
        if not eps:
            raise DataError("no episodes to write")
        writer = _LayoutWriter(tmp, fps, version, image_key, image_storage, codec, gripper_convention)
        for e, ep in enumerate(eps):
            writer.add_episode(e, ep)
        writer.finish(robot_type, np.concatenate([ep.actions for ep in eps]))
    return root


@dataclass
class _LayoutWriter:
    """Writes one dataset folder: episodes as they come (v2.1) or gathered (v3.0), then the meta files."""

    tmp: Path
    fps: float
    version: str
    image_key: str
    image_storage: str
    codec: str
    gripper_convention: GripperConvention
    tasks: dict[str, int] = field(default_factory=dict)  # instruction -> task_index
    shape: list[int] = field(default_factory=list)  # image (H, W, 3)
    data_tables: list[Any] = field(default_factory=list)  # v3.0: every episode's rows, written at the end
    episode_meta: list[dict[str, Any]] = field(default_factory=list)
    video_frames: list[np.ndarray] = field(default_factory=list)  # v3.0: every frame, one video at the end
    frames: int = 0

    @property
    def video(self) -> bool:
        return self.image_storage == "video"

    def add_episode(self, e: int, ep: Episode) -> None:
        ep.validate(where=f"episode {e}")
        if not self.shape:
            self.shape = list(ep.images.shape[1:])
        if list(ep.images.shape[1:]) != self.shape:
            raise DataError(f"episode {e}: image shape {ep.images.shape[1:]} differs from {self.shape}")
        acts = ep.actions.astype(np.float32).copy()
        acts[:, 6] = from_bridge(acts[:, 6], self.gripper_convention)
        table = self._episode_table(e, ep, acts)
        meta: dict[str, Any] = {"episode_index": e, "tasks": [ep.instruction], "length": len(ep)}
        if self.version == "v2.1":
            pq.write_table(table, _mkparent(self.tmp / f"data/chunk-000/episode_{e:06d}.parquet"))
            if self.video:
                path = self.tmp / f"videos/chunk-000/{self.image_key}/episode_{e:06d}.mp4"
                _encode_video(path, ep.images, self.fps, self.codec)
        else:
            self.data_tables.append(table)
            meta.update(self._v30_episode_meta(len(ep), acts))
            if self.video:
                self.video_frames.extend(ep.images)
        meta["_stats"] = _action_stats(acts)
        self.episode_meta.append(meta)
        self.frames += len(ep)

    def _episode_table(self, e: int, ep: Episode, acts: np.ndarray) -> Any:
        n = len(ep)
        t_idx = self.tasks.setdefault(ep.instruction, len(self.tasks))
        cols: dict[str, Any] = {
            "action": pa.array(acts.tolist(), type=pa.list_(pa.float32())),
            "timestamp": pa.array((np.arange(n) / self.fps).astype(np.float32)),
            "frame_index": pa.array(np.arange(n, dtype=np.int64)),
            "episode_index": pa.array(np.full(n, e, np.int64)),
            "index": pa.array(np.arange(self.frames, self.frames + n, dtype=np.int64)),
            "task_index": pa.array(np.full(n, t_idx, np.int64)),
        }
        if self.image_storage == "image":
            cols[self.image_key] = pa.array([{"bytes": _png(im), "path": None} for im in ep.images],
                                            type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        return pa.table(cols)

    def _v30_episode_meta(self, n: int, acts: np.ndarray) -> dict[str, Any]:
        """Where a v3.0 episode lives: its rows in the one data file, its span in the one video."""
        offset, key = self.frames, self.image_key
        meta: dict[str, Any] = {"data/chunk_index": 0, "data/file_index": 0, "dataset_from_index": offset,
                                "dataset_to_index": offset + n, "meta/episodes/chunk_index": 0,
                                "meta/episodes/file_index": 0}
        if self.video:
            meta.update({f"videos/{key}/chunk_index": 0, f"videos/{key}/file_index": 0,
                         f"videos/{key}/from_timestamp": offset / self.fps,
                         f"videos/{key}/to_timestamp": (offset + n) / self.fps})
        meta.update({f"stats/action/{k}": v for k, v in _action_stats(acts).items()})
        return meta

    def finish(self, robot_type: str, all_actions: np.ndarray) -> None:
        """The per-version meta files, meta/info.json and meta/stats.json."""
        info: dict[str, Any] = {
            "codebase_version": self.version, "robot_type": robot_type, "total_episodes": len(self.episode_meta),
            "total_frames": self.frames, "total_tasks": len(self.tasks), "chunks_size": 1000, "fps": self.fps,
            "splits": {"train": f"0:{len(self.episode_meta)}"}, "features": self._features(),
        }
        if self.version == "v2.1":
            info.update(self._finish_v21())
        else:
            info.update(self._finish_v30())
        stats = {"action": _action_stats(all_actions)}
        _mkparent(self.tmp / "meta/info.json").write_text(json.dumps(info, indent=2) + "\n")
        (self.tmp / "meta/stats.json").write_text(json.dumps(stats, indent=2) + "\n")

    def _features(self) -> dict[str, Any]:
        features: dict[str, Any] = {
            self.image_key: {"dtype": self.image_storage, "shape": self.shape,
                             "names": ["height", "width", "channel"]},
            "action": {"dtype": "float32", "shape": [ACTION_DIM], "names": {"motors": list(BRIDGE_ACTION_NAMES)}},
            "timestamp": {"dtype": "float32", "shape": [1], "names": None},
            "frame_index": {"dtype": "int64", "shape": [1], "names": None},
            "episode_index": {"dtype": "int64", "shape": [1], "names": None},
            "index": {"dtype": "int64", "shape": [1], "names": None},
            "task_index": {"dtype": "int64", "shape": [1], "names": None},
        }
        if self.video:
            features[self.image_key]["info"] = {
                "video.fps": self.fps, "video.height": self.shape[0], "video.width": self.shape[1],
                "video.channels": 3, "video.codec": self.codec, "video.pix_fmt": "yuv420p",
            }
        return features

    def _rows(self) -> list[dict[str, Any]]:
        return [{k: v for k, v in m.items() if k != "_stats"} for m in self.episode_meta]

    def _finish_v21(self) -> dict[str, Any]:
        _write_jsonl(self.tmp / "meta/episodes.jsonl", self._rows())
        _write_jsonl(self.tmp / "meta/tasks.jsonl", [{"task_index": i, "task": t} for t, i in self.tasks.items()])
        _write_jsonl(self.tmp / "meta/episodes_stats.jsonl",
                     [{"episode_index": m["episode_index"], "stats": {"action": m["_stats"]}}
                      for m in self.episode_meta])
        return {"total_videos": len(self.episode_meta) if self.video else 0, "total_chunks": 1,
                "data_path": V21_DATA_PATH, "video_path": V21_VIDEO_PATH if self.video else None}

    def _finish_v30(self) -> dict[str, Any]:
        pq.write_table(pa.concat_tables(self.data_tables), _mkparent(self.tmp / "data/chunk-000/file-000.parquet"))
        if self.video:
            path = self.tmp / f"videos/{self.image_key}/chunk-000/file-000.mp4"
            _encode_video(path, self.video_frames, self.fps, self.codec)
        pq.write_table(pa.Table.from_pylist(self._rows()),
                       _mkparent(self.tmp / "meta/episodes/chunk-000/file-000.parquet"))
        pq.write_table(pa.table({"task_index": pa.array(list(self.tasks.values()), pa.int64()),
                                 "task": pa.array(list(self.tasks), pa.string())}),
                       _mkparent(self.tmp / "meta/tasks.parquet"))
        return {"data_files_size_in_mb": 100, "video_files_size_in_mb": 500, "data_path": V30_DATA_PATH,
                "video_path": V30_VIDEO_PATH if self.video else None}


def _encode_video(path: Path, frames: Sequence[np.ndarray], fps: float, codec: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames[0].shape[:2]
    if h % 2 or w % 2:
        raise DataError(f"video frames must have even height and width for yuv420p; got {w}x{h}")
    rate = fractions.Fraction(fps).limit_denominator(1000)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.time_base = 1 / rate
        if codec == "libx264":
            stream.options = {"crf": "10", "preset": "veryfast", "g": "2"}
        elif codec == "libsvtav1":
            os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints a banner to stderr per encoder unless told not to
            stream.options = {"crf": "20", "g": "2"}
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _png(rgb: np.ndarray) -> bytes:
    out = io.BytesIO()
    PILImage.fromarray(rgb).save(out, format="PNG")
    return out.getvalue()


def _action_stats(actions: np.ndarray) -> dict[str, list[float]]:
    return {"min": actions.min(0).tolist(), "max": actions.max(0).tolist(), "mean": actions.mean(0).tolist(),
            "std": actions.std(0).tolist(), "count": [len(actions)]}


def _mkparent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    _mkparent(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
