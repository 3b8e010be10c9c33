"""TrainConfig: the shipped YAML presets load, and impossible settings fail with the key and the fix named."""

from __future__ import annotations

import pytest

from refinevla_core.config import ConfigError, parse_overrides
from refinevla_core.training.config import CONFIG_DIR, TrainConfig, load_train_config

PRESET_FILES = sorted(CONFIG_DIR.glob("train_*.yaml"))


def test_the_three_presets_ship():
    names = {p.stem for p in PRESET_FILES}
    assert {"train_tiny", "train_mid", "train_paligemma2_3b"} <= names


@pytest.mark.parametrize("path", PRESET_FILES, ids=lambda p: p.stem)
def test_every_preset_file_loads_and_names_a_model_preset(path):
    from refinevla_core.model.presets import available_presets

    config = load_train_config(path)
    assert config.preset in available_presets()
    # the joint loss with the paper's λ_r, except stage 1 (action-only pretraining of the tiny base)
    assert config.lambda_rationale == (0.0 if path.stem == "train_tiny_base" else 0.3)


def cli(*items: str) -> dict:
    return parse_overrides(list(items))


def test_command_line_overrides_are_dotted_and_typed():
    config = load_train_config(CONFIG_DIR / "train_tiny.yaml", cli(
        "freeze.language_layers=0.75", "lora.enabled=true", "lr=5e-4", "dataset=data/x", "freeze.vision=true",
    ))
    assert config.freeze.language_layers == 0.75 and config.lora.enabled and config.lr == 5e-4
    assert config.freeze.vision and config.dataset == "data/x"
    assert load_train_config(None, cli("freeze.language_layers=6")).freeze.language_layers == 6
    assert load_train_config(None, cli("freeze.language_layers=75%")).freeze.language_layers == "75%"
    assert load_train_config(None, cli(r"freeze.language_layers=layers\.[0-5]$")).freeze.language_layers == (
        r"layers\.[0-5]$")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lambda_rationale": "-1"}, "lambda_rationale must be >= 0"),
        ({"rationale_dropout": "1.5"}, "rationale_dropout"),
        ({"max_steps": "null"}, "give max_steps or epochs"),
        ({"epochs": "2"}, "not both"),
        ({"precision": "fp8"}, "precision"),
        ({"schedule": "step"}, "schedule"),
        ({"freeze.language_layers": "2.5"}, "fraction must be in"),
        ({"freeze.new_token_rows": "input"}, "new_token_rows"),
        ({"lora.r": "0"}, "lora: r and alpha"),
        ({"lora.target_modules": "[q_proj, 'layers.*']"}, "plain module names"),
        ({"lamda_rationale": "0.3"}, "unknown key"),
        ({"device": "cuda:1"}, "accelerate launch"),
    ],
)
def test_bad_settings_are_clear_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(CONFIG_DIR / "train_tiny.yaml", cli(*(f"{k}={v}" for k, v in overrides.items())))


def test_warmup_from_steps_or_ratio():
    assert TrainConfig(warmup_steps=7).warmup_for(100) == 7
    assert TrainConfig(warmup_ratio=0.1).warmup_for(100) == 10
