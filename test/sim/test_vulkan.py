"""Without a usable Vulkan driver the simulator, its setup check and the bridge node fail with one message that
names the fix (the usual failure on a new machine), not with a renderer stack trace."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from test.ros.rosutil import ROOT

NO_VULKAN = {**os.environ, "VK_ICD_FILENAMES": "/nonexistent/vulkan_icd.json"}
FIX = "./setup.sh"


@pytest.mark.sim
def test_backend_and_setup_check_name_the_fix():
    code = ("import sys\n"
            "from refinevla_core.sim.backend import SimError, make_backend\n"
            "from refinevla_core.sim.check import main as setup_check\n"
            "from refinevla_core.sim.config import SimConfig\n"
            "try:\n    make_backend(SimConfig(task='PushCube-v1', image_size=64)).reset(0)\n"
            "except SimError as e:\n    print('SimError:', e)\nelse:\n    print('rendered')\n"
            "sys.exit(10 + setup_check())\n")
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=NO_VULKAN, capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert "SimError: ManiSkill3 could not create a Vulkan device" in r.stdout, r.stdout + r.stderr[-2000:]
    assert FIX in r.stdout and "VK_ICD_FILENAMES" in r.stdout
    assert r.returncode == 11 and "[sim check] FAILED" in r.stderr and FIX in r.stderr  # setup.sh's check fails too


@pytest.mark.sim
def test_bridge_node_exits_with_the_fix():
    r = subprocess.run([sys.executable, "-W", "ignore", "-m", "refinevla_ros.sim_bridge_node", "--ros-args",
                        "-p", "sim.image_size:=64"], env=NO_VULKAN, capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr[-2000:]
    assert re.search(r"\[sim_bridge\]:? cannot start: ManiSkill3 could not create a Vulkan device", r.stderr), r.stderr
    assert FIX in r.stderr
