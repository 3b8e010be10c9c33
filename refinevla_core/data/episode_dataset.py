"""The project's own episode format: a folder the sim collector, the bag converter and the annotator all write.

    <root>/meta.json                 format, version, name, fps, conventions, episode/frame counts
    <root>/episodes/000000.npz       images (T,H,W,3) uint8, actions (T,7) float32
    <root>/episodes/000000.json      instruction, task, success, seed, length, privileged states, metadata
    <root>/rationales.jsonl          exported teacher rationales: {"episode", "frame", "rationale": {...}, "teacher"}
    <root>/stats.json                action normalisation statistics (refinevla_core.data.stats)

Why this shape: an episode is written with two atomic renames (npz, then json; the json is the commit marker), so a
collector killed mid-episode leaves no half episode behind, and readers load one episode at a time.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from refinevla_core.data.episode import DataError, Episode, Frame
from refinevla_core.io import atomic_write_bytes, atomic_write_json
from refinevla_core.rationale import Rationale, RationaleError

FORMAT = "refinevla-episodes"
VERSION = 1


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line without its newline (a writer killed mid-append), so the next append starts a clean line."""
    if not path.is_file():
        return
    with path.open("rb+") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return
        pos = size
        while pos > 0:
            step = min(65536, pos)
            fh.seek(pos - step)
            chunk = fh.read(step)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                fh.truncate(pos - step + cut + 1)
                return
            pos -= step
        fh.truncate(0)


class EpisodeDataset:
    """Read (and append to) a dataset folder in the project's own format."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        meta_path = self.root / "meta.json"
        if not meta_path.is_file():
            raise DataError(
                f"{self.root} is not a refinevla dataset (no meta.json); create one with `refinevla collect`, "
                "`refinevla convert`, or EpisodeDataset.create()"
            )
        try:
            self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{meta_path} is not valid JSON ({e}); the dataset is damaged") from e
        if self.meta.get("format") != FORMAT:
            raise DataError(f"{meta_path}: format {self.meta.get('format')!r} is not {FORMAT!r}")
        if int(self.meta.get("version", 0)) > VERSION:
            raise DataError(f"{meta_path}: format version {self.meta['version']} is newer than this refinevla")
        self._rationales: dict[tuple[int, int], Rationale] | None = None

    # ---- creation / writing ----------------------------------------------------------------------------------
    @classmethod
    def create(cls, root: str | Path, name: str = "", fps: float = 5.0, exist_ok: bool = False,
               **meta: Any) -> EpisodeDataset:
        root = Path(root)
        if (root / "meta.json").exists():
            if not exist_ok:
                raise DataError(f"{root} already holds a dataset; pass exist_ok=True to append to it")
            return cls(root)
        (root / "episodes").mkdir(parents=True, exist_ok=True)
        atomic_write_json(root / "meta.json", {
            "format": FORMAT, "version": VERSION, "name": name or root.name, "fps": fps,
            "action_names": ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"],
            "gripper_convention": "bridge: 1 = open, 0 = closed",
            "num_episodes": 0, "num_frames": 0, **meta,
        })
        return cls(root)

    def append(self, episode: Episode) -> int:
        """Validate and write one episode atomically; returns its index."""
        index = len(self)
        episode.validate(where=f"{self.root} episode {index}")
        stem = self.root / "episodes" / f"{index:06d}"
        buf = io.BytesIO()
        np.savez_compressed(buf, images=episode.images, actions=episode.actions)
        atomic_write_bytes(stem.with_suffix(".npz"), buf.getvalue())
        atomic_write_json(stem.with_suffix(".json"), {
            "instruction": episode.instruction, "task": episode.task, "success": episode.success,
            "seed": episode.seed, "length": len(episode), "image_shape": list(episode.images.shape[1:]),
            "states": episode.states, "metadata": episode.metadata,
        })
        if episode.rationales is not None:
            self.add_rationales(
                (index, t, r, episode.metadata.get("teacher", "")) for t, r in enumerate(episode.rationales) if r
            )
        self.meta["num_episodes"] = index + 1
        self.meta["num_frames"] = int(self.meta.get("num_frames", 0)) + len(episode)
        atomic_write_json(self.root / "meta.json", self.meta)
        return index

    def add_rationales(self, rows: Any) -> int:
        """Append (episode, frame, Rationale, teacher) rows to rationales.jsonl (one write, then fsync)."""
        lines = [json.dumps({"episode": e, "frame": f, "rationale": r.to_dict(), "teacher": t}) for e, f, r, t in rows]
        if lines:
            path = self.root / "rationales.jsonl"
            _drop_torn_tail(path)  # a writer killed mid-line must not glue its fragment onto our first row
            with path.open("a") as fh:
                fh.write("\n".join(lines) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        self._rationales = None
        return len(lines)

    # ---- reading ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        # episodes whose json (the commit marker) exists; meta may lag one crash behind
        n = int(self.meta.get("num_episodes", 0))
        while (self.root / "episodes" / f"{n:06d}.json").exists():
            n += 1
        return n

    @property
    def num_frames(self) -> int:
        return int(self.meta.get("num_frames", 0))

    def episode_info(self, index: int) -> dict[str, Any]:
        path = self.root / "episodes" / f"{index:06d}.json"
        if not path.is_file():
            raise DataError(f"{self.root}: episode {index} does not exist (the dataset has {len(self)})")
        return json.loads(path.read_text())

    def rationales(self) -> dict[tuple[int, int], Rationale]:
        """(episode, frame) -> Rationale from rationales.jsonl; later lines win; bad lines raise DataError."""
        if self._rationales is None:
            out: dict[tuple[int, int], Rationale] = {}
            path = self.root / "rationales.jsonl"
            lines = path.read_text().splitlines() if path.is_file() else []
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    out[(int(row["episode"]), int(row["frame"]))] = Rationale.from_dict(row["rationale"])
                except (json.JSONDecodeError, KeyError, TypeError, RationaleError) as e:
                    if n == len(lines):
                        break  # a torn last line from a killed writer: ignore it
                    raise DataError(f"{path}:{n}: malformed rationale row ({e})") from e
            self._rationales = out
        return self._rationales

    def load_episode(self, index: int, with_images: bool = True) -> Episode:
        info = self.episode_info(index)
        npz_path = self.root / "episodes" / f"{index:06d}.npz"
        try:
            with np.load(npz_path) as z:
                actions = z["actions"]
                images = z["images"] if with_images else np.zeros((len(actions), 0, 0, 3), np.uint8)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(f"{npz_path} is unreadable ({e}); the episode file is damaged") from e
        rats = self.rationales()
        per_frame = [rats.get((index, t)) for t in range(len(actions))]
        ep = Episode(
            images=images, actions=actions, instruction=info["instruction"], task=info.get("task", ""),
            success=info.get("success"), seed=info.get("seed"), states=info.get("states"),
            rationales=per_frame if any(r is not None for r in per_frame) else None,
            metadata=info.get("metadata") or {},
        )
        if with_images:
            ep.validate(where=f"{self.root} episode {index}")
        return ep

    def __iter__(self) -> Iterator[Episode]:
        for i in range(len(self)):
            yield self.load_episode(i)

    def iter_frames(self) -> Iterator[Frame]:
        for i in range(len(self)):
            yield from self.load_episode(i).frames(episode_index=i)

    def all_actions(self) -> np.ndarray:
        """(N, 7) float32 actions of every frame, without loading images (for statistics)."""
        chunks = [self.load_episode(i, with_images=False).actions for i in range(len(self))]
        if not chunks:
            raise DataError(f"{self.root} has no episodes")
        return np.concatenate(chunks).astype(np.float32)
