"""`refinevla bench <what>`: performance measured as ratios against a baseline run in the same process and moment.

Each benchmark is a module `refinevla_core.bench.<what>` with ``add_arguments(parser)`` and ``run(args) -> dict``
(the result); the ones that drive ROS 2 nodes come from the ROS package through `refinevla.benches` entry points
(refinevla_core.plugins). This module dispatches and writes the result as JSON + Markdown under runs/bench/
(`--out benchmarks` updates the committed results), with the machine it ran on, because a ratio without its machine
is not a result.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from refinevla_core.io import atomic_write_text
from refinevla_core.plugins import BENCHES, plugin_module

BENCHMARKS: dict[str, tuple[str | None, int]] = {
    # name: (module, or None for the `refinevla.benches` entry point of that name; issue that builds it)
    "annotate": ("refinevla_core.bench.annotate", 4),
    "infer": ("refinevla_core.bench.infer", 5),
    "train": ("refinevla_core.bench.train", 6),
    "ros": (None, 7),
    "sim": (None, 8),  # drives sim_bridge_node: ROS code, so it lives in the ROS package
    "record": (None, 9),
    "gpu": ("refinevla_core.bench.gpu", 13),  # on CUDA: real sizes in bf16; on CPU: tiny sizes
}


def _exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def benchmark_module(name: str) -> str | None:
    """The module of benchmark `name` when it is installed (not imported here)."""
    module, _ = BENCHMARKS[name]
    if module is None:
        return plugin_module(BENCHES, name)
    return module if _exists(module) else None


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
        info["memory_gib"] = round(mem_kb / 2**20, 1)
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parents[2],
        ).stdout.strip()
    return info


def _markdown(name: str, result: dict[str, Any], machine: dict[str, Any]) -> str:
    lines = [f"# refinevla bench {name}", "", f"Run {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", ""]
    summary = result.get("summary")
    if isinstance(summary, str):
        lines += [summary, ""]
    table = result.get("table")
    if isinstance(table, list) and table and isinstance(table[0], dict):
        cols = list(table[0])
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for row in table:
            lines.append("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
        lines.append("")
    lines += ["## Machine", ""] + [f"- {k}: {v}" for k, v in machine.items()] + [""]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_result(name: str, result: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write benchmarks/<name>.json and .md (atomically: a killed run leaves the previous result intact)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    payload = {"benchmark": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine, **result}
    paths = []
    texts = {".json": json.dumps(payload, indent=2, default=str), ".md": _markdown(name, result, machine)}
    for suffix, text in texts.items():
        path = out_dir / f"{name}{suffix}"
        atomic_write_text(path, text + "\n")
        paths.append(path)
    return paths[0], paths[1]


DEFAULT_OUT = Path("runs") / "bench"  # not benchmarks/: a casual run must not overwrite the committed results

EPILOG = """\
examples:
  refinevla bench infer --presets tiny              # writes runs/bench/infer.json and .md
  refinevla bench --out benchmarks train            # refresh the committed results in benchmarks/
  refinevla bench annotate --help                   # each benchmark's own options
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--out", "--out-dir", dest="out_dir", type=Path, default=DEFAULT_OUT,
                        help=f"folder for <benchmark>.json and .md (default: {DEFAULT_OUT}; "
                             "--out benchmarks updates the committed results)")
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", help="what to measure")
    for name, (_, issue) in BENCHMARKS.items():
        module = benchmark_module(name)
        if module is not None:
            try:
                mod = importlib.import_module(module)
            except Exception as e:  # one broken benchmark must not hide the others; running it re-raises
                sub.add_parser(name, help=f"[cannot be imported: {type(e).__name__}: {e}]")
                continue
            first_line = (mod.__doc__ or name).strip().splitlines()[0]
            p = sub.add_parser(name, help=first_line.replace("%", "%%"))  # argparse %-formats help strings
            mod.add_arguments(p)
        else:
            sub.add_parser(name, help=f"[not built yet: issue #{issue}]")


def run(args: argparse.Namespace) -> int:
    if not args.benchmark:
        print("refinevla bench: name a benchmark: " + ", ".join(BENCHMARKS), file=sys.stderr)
        return 2
    module, issue = benchmark_module(args.benchmark), BENCHMARKS[args.benchmark][1]
    if module is None:
        print(f"refinevla bench {args.benchmark}: not built yet (planned in issue #{issue}); nothing was run.",
              file=sys.stderr)
        return 3
    result = importlib.import_module(module).run(args)
    json_path, md_path = write_result(args.benchmark, result, args.out_dir)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return 0
