"""sim_bridge_node's parameters: config/sim_bridge.yaml holds exactly SimBridgeConfig's fields with their defaults,
and a bad value stops the node at start with a message naming the parameter (before any simulator is made)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import yaml

from refinevla_core.config import from_dict, to_dict
from refinevla_core.sim.config import SimBridgeConfig
from test.ros.rosutil import ROOT


def test_yaml_mirrors_the_config_and_its_defaults():
    params = yaml.safe_load((ROOT / "config" / "sim_bridge.yaml").read_text())["sim_bridge"]["ros__parameters"]
    assert from_dict(SimBridgeConfig, params) == SimBridgeConfig()
    assert params == to_dict(SimBridgeConfig())  # every field listed, nothing extra
    assert {f.name for f in dataclasses.fields(SimBridgeConfig)} == set(params)


def test_bad_parameter_is_named_at_start():
    r = subprocess.run([sys.executable, "-m", "refinevla_ros.sim_bridge_node", "--ros-args", "-p",
                        "step_mode:=fast"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 1
    assert "cannot start" in r.stderr and "step_mode" in r.stderr and "lockstep" in r.stderr, r.stderr[-2000:]
