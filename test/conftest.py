"""Test-wide environment: DDS on loopback only, a private ROS domain, ROS logs in a temp dir, one torch thread.

Set before anything imports rclpy, so the test process and every node it starts use the same loopback profile.
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _loopback_profile() -> str:
    env = os.environ.get("REFINEVLA_FASTDDS_LOOPBACK")
    if env and Path(env).is_file():
        return env
    venv = Path(sys.prefix) / "share/refinevla/fastdds_loopback.xml"
    if venv.is_file():
        return str(venv)
    raise RuntimeError("fastdds_loopback.xml not found: run ./setup.sh (the tests must not use DDS off loopback)")


os.environ["FASTRTPS_DEFAULT_PROFILES_FILE"] = _loopback_profile()
os.environ.pop("ROS_AUTOMATIC_DISCOVERY_RANGE", None)  # it would override the XML transports
# a private domain per test run: concurrent runs on one machine must not hear each other
os.environ.setdefault("ROS_DOMAIN_ID", str(random.Random(os.getpid()).randint(1, 100)))
os.environ.setdefault("ROS_LOG_DIR", tempfile.mkdtemp(prefix="refinevla-roslog-"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
