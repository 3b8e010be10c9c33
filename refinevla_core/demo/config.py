"""DemoConfig: every number of `refinevla demo` in one dataclass, so the full run and --quick differ only in data.

config/demo.yaml holds two sections: `full` (a complete DemoConfig) and `quick` (only the keys that differ, merged
over `full`). `--set key=value` (dotted keys, e.g. `train.max_steps=400`) overrides either. The values were chosen by
measurement on 2 shared CPU cores (docs/demo.md): change them together with
the time budget they are checked against.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from refinevla_core.config import ConfigError, check_overrides, find_config_file, from_dict, set_dotted

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "config" / "demo.yaml"
RationaleMode = Literal["action_only", "every_step", "every_n"]


@dataclass
class CollectSettings:
    """Scripted-expert demonstrations (refinevla_core.sim.collect.CollectConfig for each shard)."""

    task: str = "PushCube-v1"
    episodes: int = 300
    seed: int = 0  # episode i uses seed + i; evaluation seeds (eval.seed) must not overlap
    image_size: int = 112
    instruction_mode: Literal["varied", "canonical"] = "varied"
    noise_fraction: float = 0.5  # DART-style: executed translation noisy in this share of episodes, labels clean
    noise_std_m: float = 0.05
    workers: int = 2  # simulator processes collecting shards in parallel, merged into one dataset

    def __post_init__(self) -> None:
        if self.episodes < 2:
            raise ConfigError(f"collect.episodes must be >= 2 (one is held out for validation), got {self.episodes}")
        if self.workers < 1:
            raise ConfigError(f"collect.workers must be >= 1, got {self.workers}")


@dataclass
class ModelSettings:
    """One model the demo trains and compares; the other training keys are shared (TrainSettings)."""

    name: str  # folder name and label in the report (letters, digits, - and _)
    description: str = ""
    lambda_rationale: float = 0.3  # 0: the action-only baseline
    rationale_dropout: float = 0.2  # 1.0: never shown a rationale (the clean λ_r = 0 baseline)
    target_order: Literal["rationale_then_action", "action_then_rationale"] = "rationale_then_action"
    eval_rationale_mode: RationaleMode = "every_n"  # how policy_node runs it in the closed-loop evaluation
    extra: dict[str, Any] = field(default_factory=dict)  # this model's own TrainConfig keys: {freeze.vision: false}

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "-_" for c in self.name):
            raise ConfigError(f"model name {self.name!r} must be letters, digits, '-' or '_' (it names a folder)")

    @property
    def has_rationale(self) -> bool:
        return self.lambda_rationale > 0 and self.rationale_dropout < 1.0


@dataclass
class TrainSettings:
    """Shared training settings; the keys not listed here come from `base_config` (a `refinevla train` YAML)."""

    base_config: str = "config/train_tiny.yaml"  # relative to the repository root, or absolute
    max_steps: int = 1000  # the same for every model: the comparison is at equal optimizer steps
    batch_size: int = 16
    lr: float = 1.0e-3
    warmup_steps: int = 100
    max_rationale_tokens: int = 96
    val_fraction: float = 0.1
    val_max_frames: int = 200
    eval_every: int = 250
    save_every: int = 100  # checkpoints: a killed demo resumes training from the newest one
    parallel: int = 3  # training processes at a time, 1 torch thread each
    extra: dict[str, Any] = field(default_factory=dict)  # any other TrainConfig key, e.g. {weight_decay: 0.01}
    models: list[ModelSettings] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.parallel < 1:
            raise ConfigError("train.max_steps and train.parallel must be >= 1")
        names = [m.name for m in self.models]
        if not names:
            raise ConfigError("train.models is empty; list at least one model to train")
        if len(set(names)) != len(names):
            raise ConfigError(f"train.models has duplicate names: {names}")


@dataclass
class EvalSettings:
    """Closed-loop evaluation through policy_node + sim_bridge_node, plus in-process references."""

    episodes: int = 20  # per model
    seed: int = 1000  # episode i uses seed + i (collect starts at 0: no training scene is evaluated)
    max_steps: int = 0  # 0: the task's limit (50)
    lanes: int = 2  # independent bridges (each on its own private ROS domain) evaluating models in parallel
    rationale_every_n: int = 10  # every_n mode: a fresh rationale every n steps
    reference_episodes: int = 20  # scripted expert and random policy, in-process, the same seeds
    references: list[str] = field(default_factory=lambda: ["expert", "random"])
    step_timeout_s: float = 120.0  # no progress for this long -> the evaluation fails with the node logs
    base_reference: bool = True  # also evaluate the pretrained base alone (when train.base_config has one)

    def __post_init__(self) -> None:
        if self.episodes < 1 or self.lanes < 1:
            raise ConfigError("eval.episodes and eval.lanes must be >= 1")
        unknown = sorted(set(self.references) - {"expert", "random"})
        if unknown:
            raise ConfigError(f"eval.references {unknown} unknown; choose from ['expert', 'random']")


@dataclass
class AnalysisSettings:
    """Offline measurements per model on held-out (validation) frames."""

    example_frames: int = 4  # frames shown with teacher vs generated rationales and attention overlays
    diagnostic_frames: int = 64  # frames of the forced-rationale diagnostic (action L1 per rationale source)
    latency_steps: int = 20  # policy steps per rationale mode in the latency table
    workers: int = 2

    def __post_init__(self) -> None:
        if min(self.example_frames, self.diagnostic_frames, self.latency_steps, self.workers) < 1:
            raise ConfigError("analysis: example_frames, diagnostic_frames, latency_steps and workers must be >= 1")


@dataclass
class DemoConfig:
    mode: Literal["full", "quick"] = "full"
    time_budget_s: float = 1500.0  # what the run is compared against in the report (not enforced)
    claims: bool = True  # False (quick): the report states that no success-rate claim is made
    collect: CollectSettings = field(default_factory=CollectSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    analysis: AnalysisSettings = field(default_factory=AnalysisSettings)

    def __post_init__(self) -> None:
        if self.eval.seed < self.collect.seed + self.collect.episodes and self.eval.seed >= self.collect.seed:
            raise ConfigError(f"eval.seed {self.eval.seed} falls inside the collected seeds "
                              f"{self.collect.seed}..{self.collect.seed + self.collect.episodes - 1}; evaluate on "
                              "scenes the models never saw (e.g. eval.seed=1000)")


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Nested dict merge; lists and scalars in `over` replace those in `base`."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_demo_config(path: str | Path | None = None, quick: bool = False,
                     overrides: dict[str, Any] | None = None) -> DemoConfig:
    """DemoConfig from the YAML's `full` section, with `quick` merged over it when asked, then `overrides`."""
    p = find_config_file(path if path is not None else "demo")  # a path, or a shipped preset by name
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"demo config {p} is not valid YAML: {e}") from e
    if not isinstance(loaded, dict) or "full" not in loaded:
        raise ConfigError(f"demo config {p} needs a `full:` section (and optionally `quick:` with the differences)")
    extra = sorted(set(loaded) - {"full", "quick"})
    if extra:
        raise ConfigError(f"demo config {p}: unknown top-level key(s) {extra}; only `full` and `quick` exist")
    data = loaded["full"] or {}
    if quick:
        data = _merge(data, loaded.get("quick") or {})
    for key, value in check_overrides(DemoConfig, overrides).items():  # a typo is blamed on the command line
        set_dotted(data, key, value)
    return from_dict(DemoConfig, data, where=f"{p} [{'quick' if quick else 'full'}]")


def resolve_repo_path(path: str) -> Path:
    """A path from the config: absolute, or relative to the repository root (so the demo runs from any folder)."""
    p = Path(path)
    if p.is_absolute() or (DEFAULT_CONFIG.parents[1] / p).exists():
        return p if p.is_absolute() else DEFAULT_CONFIG.parents[1] / p
    return find_config_file(p)  # installed from a wheel: config/train_tiny.yaml is the shipped preset
