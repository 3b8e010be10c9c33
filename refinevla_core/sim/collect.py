"""`refinevla collect`: record scripted-expert demonstrations in the simulator into the project's episode format.

Each episode stores the camera images, the expert's Bridge-convention actions (the labels), the instruction, the
privileged state of every frame (for the sim teacher's rationales) and whether the task was solved. Episode i of a
dataset always uses seed `--seed + i` and task `tasks[i % len(tasks)]`, so a collection killed at any point resumes
where it stopped and a rerun of a finished collection does nothing: the dataset is a pure function of its arguments.
Failed episodes are kept (with success = false) unless --only-success: what is dropped is a choice, not an accident.

Optional DART-style noise (--noise-fraction, --noise-std-m): in that fraction of episodes the EXECUTED translation
gets Gaussian noise while the stored label stays the expert's clean action, so a policy sees recoveries from states
the clean expert never visits (the CPU demo's data recipe). Executed actions are kept in the episode metadata.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from refinevla_core.data.episode import DataError, Episode
from refinevla_core.data.episode_dataset import EpisodeDataset
from refinevla_core.data.stats import compute_dataset_stats
from refinevla_core.sim.backend import SimBackend, SimError, make_backend
from refinevla_core.sim.config import SimConfig
from refinevla_core.sim.experts import EXPERTS, ExpertError, expert_step

EXPERT_VERSION = 1  # bump when the experts' behaviour changes: part of a dataset's identity
# arguments that define a dataset's content; resuming with different values would mix two datasets
IDENTITY_KEYS = ("tasks", "seed", "image_size", "max_steps", "control_mode", "instruction_mode", "noise_fraction",
                 "noise_std_m", "only_success", "expert_version")


@dataclass
class CollectConfig:
    tasks: list[str] = field(default_factory=lambda: ["PushCube-v1"])
    episodes: int = 10  # the dataset's target size (episodes already there count)
    out: Path = Path("data/sim")
    seed: int = 0
    image_size: int = 112
    max_steps: int = 0
    control_mode: str = "pd_ee_delta_pose"
    instruction_mode: str = "varied"
    noise_fraction: float = 0.0
    noise_std_m: float = 0.02
    only_success: bool = False
    expert_version: int = EXPERT_VERSION

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in EXPERTS]
        if unknown:
            raise ValueError(f"no scripted expert for {unknown}; collect supports {sorted(EXPERTS)}")
        if self.episodes < 0:
            raise ValueError(f"--episodes {self.episodes} must be >= 0")
        if not 0.0 <= self.noise_fraction <= 1.0:
            raise ValueError(f"--noise-fraction {self.noise_fraction} must be within 0..1")
        if self.noise_std_m < 0:
            raise ValueError(f"--noise-std-m {self.noise_std_m} must be >= 0")

    def identity(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: d[k] for k in IDENTITY_KEYS}

    def sim_config(self, task: str) -> SimConfig:
        return SimConfig(backend="maniskill", task=task, image_size=self.image_size, max_steps=self.max_steps,
                         control_mode=self.control_mode,  # type: ignore[arg-type]
                         instruction_mode=self.instruction_mode)  # type: ignore[arg-type]


@dataclass
class CollectSummary:
    out: Path
    added: int = 0
    skipped_failures: int = 0
    total: int = 0
    successes_added: int = 0
    frames_added: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        rate = f"{self.successes_added}/{self.added + self.skipped_failures}" if self.added or self.skipped_failures \
            else "-"
        return (f"{self.out}: {self.total} episodes ({self.added} new, {self.frames_added} frames, expert success "
                f"{rate}, {self.skipped_failures} failures dropped) in {self.seconds:.1f} s")


def record_episode(backend: SimBackend, seed: int, noise_std_m: float = 0.0,
                   noise_rng: np.random.Generator | None = None) -> Episode:
    """Run the scripted expert for one episode and return it (images before each action, clean labels)."""
    obs = backend.reset(seed)
    images, actions, states, executed = [], [], [], []
    while True:
        state = backend.privileged_state()
        _, label = expert_step(state)
        act = label.copy()
        if noise_std_m > 0 and noise_rng is not None:
            act[:3] = act[:3] + noise_rng.normal(0.0, noise_std_m, 3)
        images.append(obs.image)
        states.append(state)
        actions.append(label.astype(np.float32))
        result = backend.step(act)
        executed.append(np.round(result.info["executed_action"], 6).tolist())
        obs = result.obs
        if result.done:
            break
    return Episode(
        images=np.stack(images), actions=np.stack(actions), instruction=backend.instruction, task=backend.task,
        success=bool(backend.episode.ever_success), seed=seed, states=states,
        metadata={"backend": backend.name, "control_mode": backend.config.control_mode, "fps": 20,
                  "expert": f"scripted:v{EXPERT_VERSION}", "noise_std_m": noise_std_m,
                  "executed_actions": executed, "max_steps": backend.max_steps},
    )


def _open_dataset(cfg: CollectConfig) -> EpisodeDataset:
    identity = cfg.identity()
    if (cfg.out / "meta.json").exists():
        ds = EpisodeDataset(cfg.out)
        have = ds.meta.get("collect")
        if have is None:
            raise DataError(f"{cfg.out} holds a dataset not written by `refinevla collect`; choose another --out")
        diff = {k: (have.get(k), identity[k]) for k in IDENTITY_KEYS if have.get(k) != identity[k]}
        if diff:
            listed = ", ".join(f"{k}: dataset {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise DataError(f"{cfg.out} was collected with other arguments ({listed}); rerun with the dataset's "
                            "arguments to resume it, or choose another --out for a new dataset")
        return ds
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    return EpisodeDataset.create(cfg.out, name=cfg.out.name, fps=20.0, collect=identity, source="refinevla collect")


def collect(cfg: CollectConfig, progress: bool = True, backends: dict[str, SimBackend] | None = None
            ) -> CollectSummary:
    """Fill `cfg.out` up to `cfg.episodes` episodes (resuming after the last complete one). `backends` (task -> open
    backend configured like cfg.sim_config(task)) reuses simulators the caller owns; others are made and closed."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    ds = _open_dataset(cfg)
    summary = CollectSummary(out=cfg.out)
    owned: dict[str, SimBackend] = {}
    backends = dict(backends or {})
    for task, backend in backends.items():
        want, have = cfg.sim_config(task), backend.config
        keys = ("task", "image_size", "max_steps", "control_mode", "instruction_mode", "reconfigure_each_episode")
        if any(getattr(want, k) != getattr(have, k) for k in keys):
            raise ValueError(f"the backend given for {task} is configured differently from the collection: "
                             f"{ {k: getattr(have, k) for k in keys} } vs { {k: getattr(want, k) for k in keys} }")
    # the attempt index (-> seed) of the next episode: kept in meta so --only-success resumes at the right seed
    attempt = int(ds.meta.get("next_attempt", len(ds)))
    bar = tqdm(total=cfg.episodes, initial=min(len(ds), cfg.episodes), desc=f"collect {','.join(cfg.tasks)}",
               unit="ep", disable=not progress, file=sys.stderr)
    try:
        while len(ds) < cfg.episodes:
            task = cfg.tasks[attempt % len(cfg.tasks)]
            seed = cfg.seed + attempt
            if task not in backends:
                backends[task] = owned[task] = make_backend(cfg.sim_config(task))
            noisy = random.Random(f"noise:{seed}").random() < cfg.noise_fraction
            rng = np.random.default_rng(seed) if noisy else None
            episode = record_episode(backends[task], seed, cfg.noise_std_m if noisy else 0.0, rng)
            attempt += 1
            summary.successes_added += int(bool(episode.success))
            if cfg.only_success and not episode.success:
                summary.skipped_failures += 1
            else:
                ds.meta["next_attempt"] = attempt  # written together with the episode by append()
                ds.append(episode)
                summary.added += 1
                summary.frames_added += len(episode)
                bar.update(1)
            bar.set_postfix(success=f"{summary.successes_added}/{summary.added + summary.skipped_failures}")
            if cfg.only_success and summary.skipped_failures > 10 + 2 * summary.added:
                raise SimError(f"the expert fails too often on {cfg.tasks} ({summary.skipped_failures} failures, "
                               f"{summary.added} successes); check the task and --max-steps")
    finally:
        bar.close()
        for b in owned.values():
            b.close()
    summary.total = len(ds)
    summary.seconds = time.perf_counter() - t0
    return summary


def merge_datasets(sources: list[Path], out: Path, progress: bool = True) -> int:
    """Append the episodes of collected datasets (e.g. shards collected side by side) into `out`, in order, and
    compute its action statistics. Resumable: episodes already in `out` (by source and seed) are skipped."""
    from tqdm import tqdm

    datasets = [EpisodeDataset(s) for s in sources]
    names = [str(Path(s).resolve()) for s in sources]
    if (out / "meta.json").exists():
        merged = EpisodeDataset(out)
        if merged.meta.get("merged_from") != names:
            raise DataError(f"{out} holds another merge ({merged.meta.get('merged_from')}); choose another --out")
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        merged = EpisodeDataset.create(out, name=out.name, fps=20.0, merged_from=names,
                                       collect=[d.meta.get("collect") for d in datasets], source="refinevla collect")
    refs = [(d, i) for d in datasets for i in range(len(d))]
    for d, i in tqdm(refs[len(merged):], desc="merge", unit="ep", disable=not progress, file=sys.stderr):
        merged.append(d.load_episode(i))
    compute_dataset_stats(merged)
    return len(merged)


# ---- CLI -----------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", nargs="+", default=["PushCube-v1"], metavar="TASK",
                        help=f"task(s), cycled per episode; one of {sorted(EXPERTS)}")
    parser.add_argument("--episodes", type=int, help="target number of episodes in the dataset")
    parser.add_argument("--out", type=Path, required=True, help="dataset folder (created, or resumed)")
    parser.add_argument("--image-size", type=int, default=112, help="square camera image size in pixels")
    parser.add_argument("--seed", type=int, default=0, help="seed of episode 0; episode i uses seed + i")
    parser.add_argument("--max-steps", type=int, default=0, help="episode step limit (0 = the task's, 50)")
    parser.add_argument("--control-mode", default="pd_ee_delta_pose",
                        choices=["pd_ee_delta_pose", "pd_ee_target_delta_pose"],
                        help="how the simulator applies the 7-D action: a delta from the current end-effector pose "
                             "(default) or from the previous target")
    parser.add_argument("--instruction-mode", default="varied", choices=["varied", "canonical"],
                        help="varied: paraphrased instructions per episode (default); canonical: the task's one "
                             "sentence")
    parser.add_argument("--noise-fraction", type=float, default=0.0,
                        help="fraction of episodes whose executed translation gets noise (labels stay clean)")
    parser.add_argument("--noise-std-m", type=float, default=0.02, help="std of that noise per axis, metres")
    parser.add_argument("--only-success", action="store_true", help="drop episodes the expert failed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="DATASET",
                        help="instead of collecting: append these collected datasets (e.g. shards collected side by "
                             "side) into --out, in order, with action statistics")


def run(args: argparse.Namespace) -> int:
    if args.merge:
        try:
            n = merge_datasets(list(args.merge), args.out, progress=not args.no_progress)
        except DataError as e:
            print(f"refinevla collect --merge: {e}", file=sys.stderr)
            return 2
        print(f"{args.out}: {n} episodes merged from {len(args.merge)} datasets")
        return 0
    if args.episodes is None:
        print("refinevla collect: --episodes is required (or --merge DATASET ...)", file=sys.stderr)
        return 2
    try:
        cfg = CollectConfig(tasks=list(args.task), episodes=args.episodes, out=args.out, seed=args.seed,
                            image_size=args.image_size, max_steps=args.max_steps, control_mode=args.control_mode,
                            instruction_mode=args.instruction_mode, noise_fraction=args.noise_fraction,
                            noise_std_m=args.noise_std_m, only_success=args.only_success)
        for task in cfg.tasks:
            cfg.sim_config(task)  # validates image size and step limit before anything is written
        summary = collect(cfg, progress=not args.no_progress)
    except (ValueError, SimError, DataError, ExpertError) as e:
        print(f"refinevla collect: {e}", file=sys.stderr)
        return 2
    print(summary.line())
    return 0
