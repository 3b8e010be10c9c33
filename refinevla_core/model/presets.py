"""Model presets: build a ReFineVLA model + processor from a name, fully offline for the random-init sizes.

Why: tests, the CPU demo and the trainer need a real PaliGemma-architecture VLA without any download. A preset is a
YAML file config/model_<name>.yaml holding a RefineVLAConfig:

  - tiny: Gemma2 4L h128 + SigLIP 2L h128, 112 px / patch 14 (64 image tokens), ~1.7M parameters, random init.
  - mid: Gemma2 8L h512 + SigLIP 4L h384, 224 px (256 image tokens), ~40M parameters, random init (CPU demo).
  - paligemma2-3b-224: the paper-scale base (SpatialVLA is PaliGemma2-based) from a local folder or hub id
    (`base.pretrained`), for GPU users.
  - paligemma2-3b-224-random: the same architecture with random weights and the offline tokenizer: latency and
    memory benchmarks at real size without the 6 GB download.

Random-init presets get a BPE tokenizer trained here, in a fraction of a second, on a built-in corpus of robot
instructions and rationale phrases (byte fallback: any text still encodes), then PaliGemma's processor adds <image>,
<loc>/<seg> and ReFineVLA adds its action/format tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from refinevla_core import config as config_module  # CONFIG_DIRS read at call time (tests point it elsewhere)
from refinevla_core.config import ConfigError
from refinevla_core.model.backbone import (
    base_unavailable_message,
    build_processor,
    paligemma_config,
    tokenizer_corpus,
    train_offline_tokenizer,
)
from refinevla_core.model.configuration_refinevla import RefineVLAConfig
from refinevla_core.model.modeling_refinevla import RefineVLA
from refinevla_core.model.pi0.configuration_pi0 import RefineVLAPi0Config, is_pi0_config_file
from refinevla_core.model.pi0.modeling_pi0 import build_pi0

__all__ = [  # presets, and the offline backbone pieces importable from here as before (backbone.py)
    "available_presets", "base_unavailable_message", "build_from_preset", "build_processor", "load_preset",
    "paligemma_config", "preset_path", "tokenizer_corpus", "train_offline_tokenizer",
]

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"
PRESETS = ("tiny", "mid", "paligemma2-3b-224", "paligemma2-3b-224-random")


def preset_path(name: str) -> Path:
    """config/model_<name>.yaml of the source checkout, else the copy shipped in the wheel or the ROS share."""
    return next((d / f"model_{name}.yaml" for d in config_module.CONFIG_DIRS if (d / f"model_{name}.yaml").is_file()),
                CONFIG_DIR / f"model_{name}.yaml")


def available_presets() -> list[str]:
    return [name.removeprefix("model_") for name in config_module.available_configs("model_")]


def load_preset(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> RefineVLAConfig:
    """RefineVLAConfig of a preset name (config/model_<name>.yaml) or of a YAML file path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = preset_path(str(name_or_path))
        if not path.is_file():
            raise ConfigError(f"unknown model preset {str(name_or_path)!r}; choose one of {available_presets()}")
    if is_pi0_config_file(path):  # `family: pi0`: the π0 family (refinevla_core.model.pi0)
        return RefineVLAPi0Config.from_yaml(path, overrides)  # type: ignore[return-value]
    return RefineVLAConfig.from_yaml(path, overrides)


def build_from_preset(
    name_or_config: str | Path | RefineVLAConfig,
    target_order: str | None = None,
    base_checkpoint: str | None = None,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
) -> Any:
    """A RefineVLA (model + processor, no statistics yet) from a preset name, YAML path or config.

    `target_order` overrides the preset's; `base_checkpoint` (a local folder or hub id) switches the preset to
    source "pretrained". Random weights come from torch's generator seeded with `seed`.
    """
    if isinstance(name_or_config, RefineVLAConfig):
        config = RefineVLAConfig.from_dict(name_or_config.to_dict())
    else:
        config = load_preset(name_or_config, overrides)
    if getattr(config, "family", None) == "pi0":
        return build_pi0(config, target_order, base_checkpoint, seed)
    if target_order is not None:
        config = RefineVLAConfig.from_dict({**config.to_dict(), "target_order": target_order})
    if base_checkpoint is not None:
        data = config.to_dict()
        data["base"].update(source="pretrained", pretrained=str(base_checkpoint))
        config = RefineVLAConfig.from_dict(data)
    return RefineVLA.build(config, seed=seed)
