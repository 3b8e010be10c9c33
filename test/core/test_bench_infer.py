"""`refinevla bench infer` runs end to end on the tiny preset and reports every mode against action-only (a smoke
run with a few steps; the timings themselves are not asserted — they live in benchmarks/infer.md)."""

from __future__ import annotations

import json

from refinevla_core.cli import main


def test_bench_infer_writes_ratios_for_every_mode_and_order(tmp_path):
    rc = main(["bench", "--out-dir", str(tmp_path), "infer", "--presets", "tiny", "--steps", "2", "--rounds", "1",
               "--warmup", "0", "--max-rationale-tokens", "4"])
    assert rc == 0
    result = json.loads((tmp_path / "infer.json").read_text())
    rows = {(r["order"], r["mode"]): r for r in result["table"]}
    assert set(rows) == {(o, m) for o in ("rationale_then_action", "action_then_rationale")
                         for m in ("action_only", "every_step", "every_10")}
    for (_, mode), row in rows.items():
        assert row["steps"] == 2 and row["mean_ms"] > 0
        assert row["fresh_share"] == {"action_only": 0.0, "every_step": 1.0, "every_10": 0.5}[mode]
        if mode == "action_only":
            assert row["ratio_vs_action_only"] == 1.0
    assert "tiny" in result["parameters"] and (tmp_path / "infer.md").is_file()
