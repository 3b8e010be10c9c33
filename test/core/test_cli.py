"""The `refinevla` command: every planned subcommand is listed; one that is not built says so and exits non-zero."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


def test_unbuilt_subcommand_says_so_and_exits_nonzero(monkeypatch, capsys):
    """Every stage is built today, so the rule is checked on a registered stage whose module does not exist."""
    monkeypatch.setitem(cli.SUBCOMMANDS, "later", cli.Subcommand("refinevla_core.no_such_stage", "a later stage", 99))
    assert cli.main(["later", "--anything"]) == cli.EXIT_NOT_BUILT
    err = capsys.readouterr().err
    assert "not built yet" in err and "#99" in err


def test_unbuilt_benchmark_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(bench.BENCHMARKS, "later", ("refinevla_core.bench.no_such_benchmark", 99))
    assert cli.main(["bench", "--out", str(tmp_path), "later"]) == 3
    assert "not built yet" in capsys.readouterr().err
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


def run_in(cwd, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "refinevla_core", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_train_finds_a_shipped_preset_by_name_from_any_folder(tmp_path):
    import json

    for spelling in ("train_tiny", "config/train_tiny.yaml"):
        r = run_in(tmp_path, "train", "--config", spelling, "--print-config", "max_steps=5")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["max_steps"] == 5


def test_command_line_mistakes_are_blamed_on_the_command_line(tmp_path):
    r = run_in(tmp_path, "train", "--config", "train_tiny", "--print-config", "max_step=5")
    assert r.returncode == 2
    assert "command line: unknown key max_step (did you mean max_steps?)" in r.stderr
    assert "train_tiny.yaml" not in r.stderr, "the YAML file is not at fault"
    r = run_in(tmp_path, "train", "--confg", "train_tiny")
    assert r.returncode == 2 and "unknown option --confg (did you mean --config?)" in r.stderr
    assert "required" not in r.stderr and "usage: refinevla train" in r.stderr
    r = run_in(tmp_path, "demo", "--quik")
    assert r.returncode == 2 and "refinevla demo: error: unknown option --quik (did you mean --quick?)" in r.stderr
    r = run_in(tmp_path, "bench", "infer", "--presetz", "tiny")
    assert r.returncode == 2 and "refinevla bench infer: error: unknown option --presetz" in r.stderr
    assert not (tmp_path / "runs").exists()


def test_known_abbreviations_and_negative_numbers_are_not_unknown_options():
    parser = cli.build_parser("eval")
    assert cli.unknown_option(parser, ["eval", "--check", "ckpt", "--seed", "-3"]) is None
    assert cli.unknown_option(parser, ["eval", "--", "--anything"]) is None


def test_every_help_has_examples_and_every_option_a_description():
    assert "examples:" in cli.build_parser().format_help()
    for name in cli.SUBCOMMANDS:
        sub = cli.build_parser(name).subcommands()[name]
        assert "examples:" in sub.format_help(), name
        undescribed = [a.option_strings or a.dest for a in sub.arguments() if not a.help]
        assert not undescribed, (name, undescribed)


def test_the_demo_help_examples_are_valid_overrides():
    import re

    from refinevla_core.config import parse_overrides
    from refinevla_core.demo.config import load_demo_config

    text = cli.build_parser("demo").subcommands()["demo"].format_help()
    examples = re.findall(r"--set ([a-z_.]+=\S+)", text)
    assert len(examples) >= 2
    config = load_demo_config(overrides=parse_overrides(examples))
    assert config.train.max_steps == 400


def test_bench_writes_under_runs_bench_unless_told(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parser = cli.build_parser("bench")
    assert parser.parse_args(["bench", "infer"]).out_dir == bench.DEFAULT_OUT == Path("runs/bench")
    assert parser.parse_args(["bench", "--out", "benchmarks", "infer"]).out_dir == Path("benchmarks")


def test_every_help_example_parses():
    """The examples are commands a user copies: each one names only options its command knows."""
    import shlex

    texts = [cli.TOP_LEVEL_EXAMPLES, *cli.EXAMPLES.values()]
    commands = [line.split("#")[0].strip() for text in texts for line in text.replace("\\\n", " ").splitlines()]
    commands = [c for c in commands if c.startswith("refinevla ") and "COMMAND" not in c]
    assert len(commands) >= 15
    for command in commands:
        argv = shlex.split(command)[1:]
        parser = cli.build_parser(argv[0])
        assert cli.unknown_option(parser, argv) is None, command
        args, unknown = parser.parse_known_args(argv)
        assert args.command == argv[0] and not unknown, command
