"""`refinevla bench gpu` on CPU: the command a GPU user runs, at tiny size (no GPU is needed to test it)."""

from __future__ import annotations

import json
import math

from refinevla_core.bench.gpu import _goal_lines
from refinevla_core.cli import main


def test_bench_gpu_runs_tiny_on_cpu_and_writes_json_and_markdown(tmp_path, capsys):
    rc = main(["bench", "--out", str(tmp_path), "gpu", "--steps", "2", "--warmup", "0", "--train-batch", "2"])
    assert rc == 0
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["size"] == "tiny" and result["device"].startswith("cpu")
    rows = {(r["family"], r["measure"]): r for r in result["table"]}
    assert set(rows) == {("paligemma", "action_only"), ("paligemma", "every_10"), ("paligemma", "train_step"),
                         ("pi0", "action_only"), ("pi0", "every_10"), ("pi0", "chunk"), ("pi0", "train_step")}
    for row in rows.values():
        assert row["mean_ms"] > 0 and math.isfinite(row["hz"]) and row["peak_gib"] >= 0
    assert 0 < rows[("pi0", "train_step")]["trainable"] < rows[("pi0", "train_step")]["frozen"]
    text = (tmp_path / "gpu.md").read_text()
    assert "not applicable (not measured on a GPU)" in text and "## Machine" in text


def test_goal_verdicts_on_a_gpu():
    table = [{"family": "paligemma", "measure": "action_only", "hz": 16.0, "mean_ms": 62.5},
             {"family": "pi0", "measure": "chunk", "hz": 8.0, "mean_ms": 125.0}]
    lines = _goal_lines(table, cuda=True)
    assert lines[0].endswith(": met") and lines[1].endswith(": NOT met")
