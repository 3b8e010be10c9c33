"""`refinevla bench annotate` runs end to end on a small setting: serial, concurrent and cached rows, zero cached calls.

(The speed-up itself is a measurement, recorded in benchmarks/annotate.md, not asserted here.)
"""

from __future__ import annotations

import json

from refinevla_core import cli


def test_bench_annotate_writes_its_table(tmp_path, capsys):
    rc = cli.main(["bench", "--out-dir", str(tmp_path), "annotate", "--frames", "10", "--latency-ms", "20",
                   "--concurrency", "4", "--image-size", "32"])
    assert rc == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "annotate.json").read_text())
    assert [row["teacher_calls"] for row in result["table"]] == [10, 10, 0]
    assert [row["concurrency"] for row in result["table"]] == [1, 4, 4]
    assert result["table"][1]["server_max_in_flight"] <= 4
    assert result["cached_rerun_calls"] == 0 and result["speedup"] > 0
    assert "the cached rerun made 0 teacher calls" in (tmp_path / "annotate.md").read_text()
