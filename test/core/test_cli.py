"""The `refinevla` command: every planned subcommand is listed; one that is not built says so and exits non-zero."""

from __future__ import annotations

import subprocess
import sys

import pytest

from refinevla_core import bench, cli


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "refinevla_core", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_every_stage():
    r = run_cli("--help")
    assert r.returncode == 0, r.stderr
    for name in ("annotate", "collect", "train", "eval", "attention", "demo", "record", "bench"):
        assert name in r.stdout


def test_no_command_prints_help_and_fails():
    r = run_cli()
    assert r.returncode == 2
    assert "usage" in r.stdout


@pytest.mark.parametrize("name", [n for n, s in cli.SUBCOMMANDS.items() if not cli._module_exists(s.module)])
def test_unbuilt_subcommand_says_so_and_exits_nonzero(name):
    r = run_cli(name, "--anything")
    assert r.returncode == cli.EXIT_NOT_BUILT
    assert "not built yet" in r.stderr and f"#{cli.SUBCOMMANDS[name].issue}" in r.stderr


@pytest.mark.parametrize("name", [n for n, (m, _) in bench.BENCHMARKS.items() if not bench._exists(m)])
def test_unbuilt_benchmark_says_so(name, tmp_path):
    r = run_cli("bench", "--out-dir", str(tmp_path), name)
    assert r.returncode == 3
    assert "not built yet" in r.stderr
    assert not list(tmp_path.iterdir()), "an unbuilt benchmark must not write results"


def test_bench_writes_json_and_markdown_with_machine(tmp_path):
    json_path, md_path = bench.write_result("unit", {"summary": "x", "table": [{"mode": "a", "ratio": 1.5}]}, tmp_path)
    import json

    data = json.loads(json_path.read_text())
    assert data["benchmark"] == "unit" and data["machine"]["cpu_count"] >= 1
    assert "| a | 1.5 |" in md_path.read_text()


def test_a_broken_stage_does_not_take_the_others_down(tmp_path, monkeypatch, capsys):
    (tmp_path / "refinevla_broken_stage.py").write_text("raise RuntimeError('half-written module')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.SUBCOMMANDS, "broken", cli.Subcommand("refinevla_broken_stage", "a broken stage", 0))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--help"])
    assert exit_info.value.code == 0 and "BENCHMARK" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="half-written"):
        cli.main(["broken"])
