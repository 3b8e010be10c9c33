"""`refinevla bench ros`: importable without ROS (the CLI builds its parser from it) and, as a slow test, a short
real run whose numbers are self-consistent."""

from __future__ import annotations

import argparse
import math
import subprocess
import sys

import pytest

from test.ros.rosutil import ROOT


def test_the_bench_module_imports_neither_rclpy_nor_torch():
    code = ("import sys, argparse, refinevla_ros.bench as b; p = argparse.ArgumentParser(); b.add_arguments(p); "
            "a = p.parse_args(['--frames', '4', '--soak-minutes', '1']); assert a.soak_minutes == 1.0; "
            "print(sorted(m for m in ('rclpy', 'torch', 'refinevla.msg') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@pytest.mark.slow
def test_a_short_run_measures_both_sides():
    from refinevla_ros import bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    result = bench.run(parser.parse_args(["--presets", "tiny", "--frames", "6", "--rounds", "2",
                                          "--camera-seconds", "4", "--camera-width", "160", "--camera-height", "120",
                                          "--modes", "action_only,async", "--mode-seconds", "4"]))
    rows = {row["measure"].split(",")[0]: row for row in result["table"]}
    latency = rows["tiny (random init): image -> EE delta"]
    assert latency["ros"] > 0 and latency["baseline"] > 0
    assert math.isclose(latency["ratio"], latency["ros"] / latency["baseline"])
    assert len(result["latency_ms"]["tiny (random init)"]["ros"]) + int(result["table"][1]["note"].split()[0]) == 6
    camera = result["camera_phase"]
    assert camera["images"] > 60 and camera["actions"] > 5 and camera["cores"] > 0
    assert "goal" in result["summary"]
    (runs,) = result["control_rate"].values()  # async compared with action_only on the same checkpoint
    assert [r["mode"] for r in runs] == ["action_only", "async"] and all(r["moving"] > 0 for r in runs)
    assert "async" in result["summary"] and "x action_only" in result["summary"]
