"""`refinevla bench record` runs end to end on a tiny stream (marked slow: three recorder processes)."""

from __future__ import annotations

import argparse

import pytest

from refinevla_ros import bench_record


@pytest.mark.slow
def test_bench_record_measures_every_configuration():
    args = argparse.Namespace(seconds=0.5, width=64, height=48, camera_hz=10.0, action_hz=5.0)
    result = bench_record.run(args)
    rows = result["table"]
    assert [(r["storage"], r["camera_qos"]) for r in rows] == [
        ("mcap", "reliable"), ("sqlite3", "reliable"), ("mcap", "best effort")]
    for row in rows:
        assert row["images_published"] >= 5 and row["recorder_cpu_per_wall"] > 0
        assert row["frames_converted"] == round(row["actions_recorded_ratio"] * row["actions_published"])
        if row["camera_qos"] == "reliable":
            assert row["images_recorded_ratio"] == 1.0 and row["actions_recorded_ratio"] == 1.0
    assert rows[0]["read_time_vs_mcap"] == 1.0
    assert "Worst recorded/published ratio" in result["summary"]
