"""`refinevla convert`: ROS 2 bags or a LeRobot dataset -> the project's episode format, ready to annotate and train.

    refinevla convert --bag BAG [BAG ...] --out DATASET [--config config/bag_topics.yaml] [--set key=value ...]
    refinevla convert --lerobot DIR --out DATASET [--set image_key=observation.images.image_0 ...]

Why a command of its own: it is the step between recording on a robot and training, and it must never leave a
half-written dataset behind or silently lose frames. So it

- builds the dataset in a temp folder next to DATASET and renames it into place only when every episode and the
  action statistics are written (a crash or a bad frame leaves DATASET as it was);
- is idempotent: the dataset remembers a fingerprint of its sources (paths, sizes, modification times) and settings,
  and rerunning the same conversion does nothing; a different conversion into an existing DATASET needs --overwrite;
- stops at the first bad frame with an error naming the bag/episode/frame, unless --drop-bad-frames (then it counts);
- reports what it skipped and why (steps before the first instruction, stale images, safe holds, short episodes).

Training reads the result with EpisodeDataset (refinevla_core.data.episode_dataset), and the action statistics are
already in DATASET/stats.json (refinevla_core.data.stats).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from refinevla_core.config import ConfigError, find_config_file, load_config, parse_overrides, to_dict
from refinevla_core.data.bag_reader import BagEpisodeReader
from refinevla_core.data.bag_topics import BagTopicsConfig
from refinevla_core.data.episode import DataError, Episode
from refinevla_core.data.episode_dataset import EpisodeDataset
from refinevla_core.data.lerobot import LeRobotConfig, LeRobotReader
from refinevla_core.data.source import EpisodeSource
from refinevla_core.data.stats import compute_dataset_stats
from refinevla_core.io import atomic_write_json, folder_built_in_place_of

SourceKind = Literal["bag", "lerobot"]


@dataclass
class ConvertResult:
    out: Path
    up_to_date: bool = False  # nothing was done: DATASET already holds this exact conversion
    episodes: int = 0
    frames: int = 0
    fps: float = 0.0
    image_shape: tuple[int, ...] = ()
    reports: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> str:
        if self.up_to_date:
            return f"{self.out} is up to date (same sources and settings); nothing to do"
        skipped: Counter[str] = Counter()
        for r in self.reports:
            skipped.update(r.get("skipped", {}))
        dropped = sum(r.get("dropped_bad_frames", 0) for r in self.reports)
        short = sum(r.get("dropped_short_episodes", 0) for r in self.reports)
        lines = [
            f"wrote {self.out}: {self.episodes} episode(s), {self.frames} frame(s), images "
            f"{self.image_shape[0]}x{self.image_shape[1]}, {self.fps:g} Hz",
            "  skipped steps: " + (", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "none"),
            f"  dropped bad frames: {dropped}; dropped short episodes: {short}",
        ]
        lines += [f"  warning ({r.get('bag') or r.get('dataset')}): {w}" for r in self.reports for w in r["warnings"]]
        lines.append(f"  action statistics: {self.out / 'stats.json'}")
        return "\n".join(lines)


def _fingerprint(kind: SourceKind, sources: list[Path], settings: dict[str, Any]) -> str:
    """Identity of a conversion: every source file's path, size and mtime, plus the settings."""
    h = hashlib.sha256(json.dumps({"kind": kind, "settings": settings}, sort_keys=True, default=str).encode())
    for src in sources:
        files = sorted(p for p in src.rglob("*") if p.is_file()) if src.is_dir() else [src]
        for p in files:
            st = p.stat()
            h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale_temps(out: Path) -> None:
    """Remove temp folders of conversions into `out` whose process is gone (killed mid-conversion)."""
    for tmp in out.parent.glob(f".{out.name}.converting-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _estimate_fps(episodes_meta: list[tuple[int, int, int]]) -> float:
    """Median control rate over episodes from (frames, first ns, last ns); 5 Hz (Bridge) when unknown."""
    rates = [(n - 1) / ((t1 - t0) / 1e9) for n, t0, t1 in episodes_meta if n > 1 and t1 > t0]
    return round(float(np.median(rates)), 1) if rates else 5.0


def convert(
    kind: SourceKind,
    sources: list[Path],
    out: Path,
    config: BagTopicsConfig | LeRobotConfig,
    *,
    drop_bad_frames: bool = False,
    overwrite: bool = False,
    name: str = "",
    fps: float | None = None,
    progress: bool | None = None,
) -> ConvertResult:
    """Convert `sources` into the episode dataset `out` atomically (see the module docstring); returns counts."""
    out = Path(out)
    sources = [Path(s) for s in sources]
    for s in sources:
        if not s.exists():
            raise DataError(f"{kind} source {s} does not exist")
    settings = {"config": to_dict(config), "drop_bad_frames": drop_bad_frames, "fps": fps}
    fingerprint = _fingerprint(kind, sources, settings)
    if out.exists() and _already_converted(out, fingerprint, overwrite):
        return ConvertResult(out=out, up_to_date=True, episodes=len(EpisodeDataset(out)))
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_temps(out)
    result = ConvertResult(out=out)
    tmp = out.parent / f".{out.name}.converting-{os.getpid()}"
    with folder_built_in_place_of(out, tmp, aside="replaced"):
        readers, source_fps = open_sources(kind, sources, config, drop_bad_frames)
        ds = EpisodeDataset.create(tmp, name=name or out.name, fps=fps or source_fps or 5.0)
        timing = _write_episodes(readers, ds, result, f"convert {kind}", progress)
        result.episodes = len(ds)
        if result.episodes == 0:
            raise DataError(_nothing_to_write(kind, sources, result.reports))
        result.fps = fps or source_fps or _estimate_fps(timing)
        ds.meta.update({
            "fps": result.fps,
            "converted_from": {"kind": kind, "sources": [str(s) for s in sources], "fingerprint": fingerprint,
                               "settings": settings, "reports": result.reports},
        })
        atomic_write_json(tmp / "meta.json", ds.meta)
        compute_dataset_stats(EpisodeDataset(tmp))
    return result


def _already_converted(out: Path, fingerprint: str, overwrite: bool) -> bool:
    """True when the existing dataset `out` holds this very conversion (and --overwrite is not given); DataError
    when it holds something else and --overwrite is not given."""
    try:
        existing = EpisodeDataset(out).meta.get("converted_from", {})
    except DataError:
        existing = {}
    if existing.get("fingerprint") == fingerprint and not overwrite:
        return True
    if not overwrite:
        made_from = ", ".join(existing.get("sources", [])) or "something else"
        raise DataError(
            f"{out} already exists (made from {made_from}) and differs from this conversion; pass --overwrite "
            "to replace it, or choose another --out"
        )
    return False


def open_sources(kind: SourceKind, sources: list[Path], config: BagTopicsConfig | LeRobotConfig,
                 drop_bad_frames: bool) -> tuple[list[EpisodeSource], float | None]:
    """The readers of `sources`, and the control rate they declare (LeRobot's fps; bags declare none)."""
    if kind == "lerobot":
        assert isinstance(config, LeRobotConfig)
        reader = LeRobotReader(sources[0], config, drop_bad_frames)
        return [reader], reader.fps
    assert isinstance(config, BagTopicsConfig)
    return [BagEpisodeReader(s, config, drop_bad_frames) for s in sources], None


def _write_episodes(readers: list[EpisodeSource], ds: EpisodeDataset, result: ConvertResult, desc: str,
                    progress: bool | None) -> list[tuple[int, int, int]]:
    """Append every episode of every reader to `ds`, counting frames and reports into `result` (its image_shape
    too); returns (frames, first ns, last ns) per timed episode, for _estimate_fps."""
    timing: list[tuple[int, int, int]] = []
    expected = [reader.expected_episodes() for reader in readers]
    total = None if None in expected else sum(n for n in expected if n is not None)
    disable = None if progress is None else not progress  # None: a bar only on a terminal
    with tqdm(total=total, unit="episode", desc=desc, disable=disable, file=sys.stderr) as bar:
        for reader in readers:
            for pieces in reader.source_episodes():
                bar.update(1)
                for episode in pieces:
                    _check_same_image_shape(episode, result.image_shape)
                    result.image_shape = tuple(episode.images.shape[1:])
                    ds.append(episode)
                    result.frames += len(episode)
                    bar.set_postfix(frames=result.frames)
                    meta = episode.metadata
                    if "start_time_ns" in meta:
                        timing.append((len(episode), meta["start_time_ns"], meta["end_time_ns"]))
            result.reports.append(reader.report.to_dict())
    return timing


def _check_same_image_shape(episode: Episode, shape: tuple[int, ...]) -> None:
    if shape and episode.images.shape[1:] != shape:
        raise DataError(
            f"{episode.metadata.get('bag') or episode.metadata.get('dataset')}: images are "
            f"{episode.images.shape[1:3]} but earlier episodes are {shape[:2]}; set image_size: "
            "[height, width] so every episode has one size"
        )


def _nothing_to_write(kind: SourceKind, sources: list[Path], reports: list[dict[str, Any]]) -> str:
    why = []
    for r in reports:
        if kind == "bag":
            why.append(f"{r['bag']}: {r['actions']} action message(s), skipped {dict(r['skipped']) or 'none'}, "
                       f"{r['dropped_short_episodes']} episode(s) shorter than min_episode_frames")
        else:
            why.append(f"{r['dataset']}: {r['episodes_read']} episode(s) read")
    return f"no episodes came out of {', '.join(map(str, sources))}: " + "; ".join(why)


# ---- CLI -------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--bag", nargs="+", type=Path, metavar="BAG",
                     help="rosbag2 folder(s) (sqlite3 or mcap) or storage file(s), e.g. from `refinevla record`")
    src.add_argument("--lerobot", type=Path, metavar="DIR", help="a local LeRobot dataset folder (v2.x or v3.0)")
    parser.add_argument("--out", required=True, type=Path, help="dataset folder to write (refinevla episode format)")
    parser.add_argument("--config", type=Path,
                        help="YAML settings: bags use config/bag_topics.yaml keys (the default file); LeRobot uses "
                             "image_key, action_key, gripper_convention, assume_action_layout, image_size, episodes")
    parser.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                        help="override one setting, e.g. --set time_source=header (repeatable)")
    parser.add_argument("--drop-bad-frames", action="store_true",
                        help="drop frames with NaN/inf actions or undecodable images (counted) instead of failing")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset made differently")
    parser.add_argument("--name", default="", help="dataset name stored in meta.json (default: the folder name)")
    parser.add_argument("--fps", type=float, help="control rate to record in meta.json (default: measured)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _shipped(name: str) -> Path | None:
    """The shipped preset `name` (source checkout, wheel or ROS share), or None: then the dataclass defaults."""
    try:
        return find_config_file(name)
    except ConfigError:
        return None


def run(args: argparse.Namespace) -> int:
    kind: SourceKind = "bag" if args.bag else "lerobot"
    try:
        example = "image_topic=/camera/image_raw" if kind == "bag" else "image_key=observation.images.image_0"
        overrides = parse_overrides(args.overrides, example=example)
        if kind == "bag":
            path = args.config or _shipped("bag_topics")
            config: BagTopicsConfig | LeRobotConfig = load_config(BagTopicsConfig, path, overrides)
        else:
            config = load_config(LeRobotConfig, args.config, overrides)
        sources = list(args.bag) if kind == "bag" else [args.lerobot]
        result = convert(kind, sources, args.out, config, drop_bad_frames=args.drop_bad_frames,
                         overwrite=args.overwrite, name=args.name, fps=args.fps,
                         progress=False if args.no_progress else None)
    except (DataError, ConfigError) as e:
        print(f"refinevla convert: error: {e}", file=sys.stderr)
        left = "was left unchanged" if Path(args.out).exists() else "was not created"
        print(f"refinevla convert: {args.out} {left}", file=sys.stderr)
        return 1
    print(result.summary())
    if not result.up_to_date:
        # recorded episodes carry no privileged simulator state: a VLM teacher writes their rationales
        print(f"next: refinevla annotate --dataset {args.out} --teacher openai --model MODEL, then train on it")
    return 0
