"""config/annotation.yaml mirrors AnnotationConfig, and bad values fail before any request with the fix named."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from refinevla_core.annotation import cli
from refinevla_core.annotation.config import AnnotationConfig, default_config_path
from refinevla_core.config import ConfigError, from_dict, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_yaml_is_the_dataclass_defaults():
    assert default_config_path() == ROOT / "config" / "annotation.yaml"
    assert load_config(AnnotationConfig, ROOT / "config" / "annotation.yaml") == AnnotationConfig()


def test_cli_flags_and_set_overrides_reach_the_config(tmp_path):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args([
        "--dataset", str(tmp_path), "--teacher", "openai", "--api-key-env", "", "--json-mode", "off",
        "--set", "prompt.user=Task: {instruction}", "--set", "every_k=5", "--concurrency", "3",
    ])
    cfg = cli.build_config(args)
    # text stays text: a colon does not make a YAML mapping, '' and 'off' are not None/False
    assert cfg.prompt.user == "Task: {instruction}" and cfg.api_key_env == "" and cfg.json_mode == "off"
    assert cfg.every_k == 5 and cfg.concurrency == 3 and cfg.teacher == "openai"
    assert cfg.prompt.system == AnnotationConfig().prompt.system


@pytest.mark.parametrize("data, match", [
    ({"teacher": "gpt"}, r"'gpt' is not one of \['sim', 'openai', 'hf'\]"),
    ({"every_k": 0}, "every_k must be >= 1"),
    ({"concurrency": 0}, "concurrency must be >= 1"),
    ({"image_offsets": [-1]}, "image_offsets"),
    ({"requests_per_minute": -5}, "requests_per_minute must be >= 0"),
    ({"promt": {}}, r"unknown key\(s\) \['promt'\]"),
])
def test_bad_values_name_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(AnnotationConfig, data)
