"""What a plain `pip install` gets: the presets inside the wheel (found by name from any folder) and the node
launchers on the PATH. Built from a copy of the sources, so the checkout is untouched."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from refinevla_core import config as config_module
from refinevla_core.config import find_config_file

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("refinevla_core", "refinevla_ros", "config"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                        str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (path,) = out.glob("refinevla-*.whl")
    return path


def test_the_wheel_ships_every_preset(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in sorted((ROOT / "config").glob("*.yaml")):
        assert f"refinevla_core/presets/{path.name}" in names, path.name


def test_the_wheel_puts_the_node_launchers_on_the_path(wheel):
    with zipfile.ZipFile(wheel) as z:
        entry_points = z.read(next(n for n in z.namelist() if n.endswith("entry_points.txt"))).decode()
    groups = configparser.ConfigParser(delimiters=("=",))
    groups.optionxform = str  # entry point names are case-sensitive
    groups.read_string(entry_points)
    scripts = dict(groups["console_scripts"])
    for script in ("refinevla", "refinevla-policy-node", "refinevla-sim-bridge-node", "refinevla-widowx-node",
                   "refinevla-topic"):
        assert script in scripts, script
    for group in groups.sections():  # each target exists (resolved without running it); scripts name a function
        for name, target in groups[group].items():
            module, _, function = target.partition(":")
            source = (ROOT / (module.replace(".", "/") + ".py")).read_text()
            assert function or group != "console_scripts", (group, name, target)
            assert not function or f"def {function}(" in source, (group, name, target)


def test_an_installed_wheel_finds_its_presets_by_name(wheel, tmp_path, monkeypatch):
    """Without the source checkout's config/ (as after `pip install refinevla`), names resolve to the wheel's copy."""
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path / "site", [n for n in z.namelist() if n.startswith("refinevla_core/presets/")])
    presets = tmp_path / "site" / "refinevla_core" / "presets"
    monkeypatch.setattr(config_module, "CONFIG_DIRS", (tmp_path / "no_checkout" / "config", presets))
    monkeypatch.chdir(tmp_path)
    assert find_config_file("train_tiny") == presets / "train_tiny.yaml"
    assert find_config_file("config/demo.yaml") == presets / "demo.yaml"
    from refinevla_core.model.presets import available_presets, preset_path
    from refinevla_core.training.config import load_train_config

    assert preset_path("tiny") == presets / "model_tiny.yaml" and "mid" in available_presets()
    assert load_train_config(find_config_file("tiny", prefix="train_")).preset == "tiny"
