"""Dataclass configs from YAML: typos and wrong types fail loudly with the key's name."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from refinevla_core.config import ConfigError, load_config, parse_overrides, save_config


@dataclass
class Inner:
    lr: float = 1e-3
    schedule: str = "cosine"


@dataclass
class Outer:
    name: str = "tiny"
    steps: int = 10
    lambda_rationale: float = 0.3
    use_lora: bool = False
    clip: tuple[float, float, float] = (0.05, 0.05, 0.05)
    checkpoint: str | None = None
    optim: Inner = field(default_factory=Inner)


def test_round_trip(tmp_path):
    cfg = Outer(name="mid", steps=5, optim=Inner(lr=2e-4))
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(Outer, tmp_path / "c.yaml") == cfg


def test_overrides_are_yaml_scalars(tmp_path):
    cfg = load_config(Outer, overrides=parse_overrides(["optim.lr=1e-4", "use_lora=true", "steps=3"]))
    assert cfg.optim.lr == 1e-4 and cfg.use_lora is True and cfg.steps == 3


def test_text_overrides_stay_verbatim():
    cfg = load_config(Outer, overrides=parse_overrides(["name=Task: {x}", "checkpoint=on", "steps=4"]))
    assert cfg.name == "Task: {x}" and cfg.checkpoint == "on" and cfg.steps == 4
    with pytest.raises(ConfigError, match="steps"):
        load_config(Outer, overrides=parse_overrides(["steps=[1"]))


def test_unknown_key_names_valid_keys(tmp_path):
    (tmp_path / "c.yaml").write_text("lamda_rationale: 0.5\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['lamda_rationale'\].*lambda_rationale"):
        load_config(Outer, tmp_path / "c.yaml")


@pytest.mark.parametrize("text, key", [("steps: 2.5\n", "steps"), ("use_lora: maybe\n", "use_lora"),
                                       ("clip: [1, 2]\n", "clip"), ("optim: {lr: fast}\n", "optim.lr")])
def test_wrong_types_name_the_key(tmp_path, text, key):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=key):
        load_config(Outer, tmp_path / "c.yaml")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("a: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["steps"])


def test_override_typos_are_blamed_on_the_command_line_not_the_file(tmp_path):
    (tmp_path / "c.yaml").write_text("steps: 5\n")
    with pytest.raises(ConfigError, match=r"^command line: unknown key step \(did you mean steps\?\)"):
        load_config(Outer, tmp_path / "c.yaml", parse_overrides(["step=5"]))
    with pytest.raises(ConfigError, match=r"^command line: unknown key optim.lrr \(did you mean lr\?\)"):
        load_config(Outer, tmp_path / "c.yaml", parse_overrides(["optim.lrr=1"]))
    with pytest.raises(ConfigError, match=r"^command line: steps: expected an integer"):
        load_config(Outer, tmp_path / "c.yaml", parse_overrides(["steps=many"]))
    with pytest.raises(ConfigError, match=r"^command line: steps.x: steps is not a section"):
        load_config(Outer, tmp_path / "c.yaml", parse_overrides(["steps.x=1"]))
    (tmp_path / "typo.yaml").write_text("stepz: 5\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown key\(s\) \['stepz'\] \(did you mean steps\?\)"):
        load_config(Outer, tmp_path / "typo.yaml", parse_overrides(["steps=5"]))


def test_the_missing_key_value_hint_is_the_callers_valid_example():
    with pytest.raises(ConfigError, match=r"'steps' must look like key=value \(e.g. steps=3\)"):
        parse_overrides(["steps"], example="steps=3")


def test_shipped_presets_are_found_by_name_from_any_folder(tmp_path, monkeypatch):
    from refinevla_core.config import available_configs, find_config_file

    monkeypatch.chdir(tmp_path)
    preset = find_config_file("train_tiny")
    assert preset.name == "train_tiny.yaml" and preset.is_file()
    assert find_config_file("tiny", prefix="train_") == preset
    assert find_config_file("train_tiny.yaml") == preset
    assert find_config_file("config/train_tiny.yaml") == preset, "the README's repository-relative spelling"
    assert {"train_tiny", "train_mid", "demo", "annotation"} <= set(available_configs())
    (tmp_path / "train_tiny.yaml").write_text("steps: 1\n")
    assert find_config_file("train_tiny.yaml") == Path("train_tiny.yaml"), "a file in the folder comes first"
    with pytest.raises(ConfigError, match=r"train_tin2 does not exist \(did you mean train_tiny\?\)"):
        find_config_file("train_tin2")
