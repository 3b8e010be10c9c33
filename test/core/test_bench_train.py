"""`refinevla bench train` runs each mode in its own process and reports ratios to full fine-tuning (no timing
asserts here: the numbers live in benchmarks/train.md)."""

from __future__ import annotations

import argparse

from refinevla_core.bench import train as bench_train


def test_bench_reports_each_mode_against_full_with_real_measurements():
    parser = argparse.ArgumentParser()
    bench_train.add_arguments(parser)
    args = parser.parse_args(["--preset", "tiny", "--steps", "1", "--rounds", "1", "--modes", "full,selective"])
    result = bench_train.run(args)
    rows = {row["mode"]: row for row in result["table"]}
    assert set(rows) == {"full", "selective"}
    assert rows["full"]["time vs full"] == 1.0 and rows["full"]["memory vs full"] == 1.0
    assert rows["full"]["trainable %"] == 100.0 and 0 < rows["selective"]["trainable %"] < 50
    for mode in ("full", "selective"):
        raw = result["raw"][mode][0]
        assert raw["peak_mb"] > 0 and raw["step_cpu_s"][0] > 0 and len(raw["losses"]) == 2
    assert "selective" in result["goals"] and "tiny" in result["summary"]
