"""`refinevla bench sim` end to end on a tiny budget (slow: it makes three simulators and a bridge process)."""

from __future__ import annotations

import json

import pytest

from refinevla_core.cli import main as refinevla


@pytest.mark.sim
@pytest.mark.slow
def test_bench_sim_writes_a_ratio_with_its_machine(tmp_path, capsys):
    assert refinevla(["bench", "--out-dir", str(tmp_path), "sim", "--episodes", "1", "--sizes", "64",
                      "--steps", "3", "--image-size", "64"]) == 0
    result = json.loads((tmp_path / "sim.json").read_text())
    assert result["ratio_bridge_vs_raw"] > 0 and result["bridge_alive_after"]
    assert result["machine"]["cpu_count"] and "Bridge step / raw env step" in result["summary"]
    rows = {r["measure"].split(":")[0] for r in result["table"]}
    assert {"env PushCube-v1 64px", "bridge step"} <= rows
    assert "| measure |" in (tmp_path / "sim.md").read_text()
