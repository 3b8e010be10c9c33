"""`refinevla demo`: collect -> annotate -> train -> evaluate through the ROS nodes -> report, in one command.

    refinevla demo                 # the full demo (~25 min on 2 CPU cores), output in runs/demo
    refinevla demo --quick         # mechanics only (~3 min; what CI runs), output in runs/demo_quick

Stages (each cached: a rerun skips what is done, a killed run resumes): see docs/demo.md and pipeline.py.
Importing this package stays light (no torch, no ROS): `refinevla --help` imports it to build its parser.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from refinevla_core.config import ConfigError, parse_overrides
from refinevla_core.demo.config import load_demo_config

EXIT_ERROR = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="mechanics only: a few episodes, tens of training steps, one closed-loop episode per "
                             "model (no success-rate claims); default output runs/demo_quick")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default runs/demo, or runs/demo_quick with --quick)")
    parser.add_argument("--config", type=Path, default=None, help="demo YAML (default config/demo.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                        help="override a config key (dotted), e.g. --set train.max_steps=400 --set eval.episodes=30")
    parser.add_argument("--until", choices=["collect", "annotate", "train", "eval", "analysis", "report"],
                        help="stop after this stage")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (stage banners stay)")


def run(args: argparse.Namespace) -> int:
    try:
        overrides = parse_overrides(args.overrides, example="train.max_steps=400")
        config = load_demo_config(args.config, quick=args.quick, overrides=overrides)
    except ConfigError as e:
        print(f"refinevla demo: {e}", file=sys.stderr)
        return EXIT_ERROR
    out = args.out or Path("runs/demo_quick" if args.quick else "runs/demo")
    from refinevla_core.demo.pipeline import DemoError, run_demo

    try:
        result = run_demo(config, out, progress=not args.no_progress, until=args.until)
    except DemoError as e:
        print(f"refinevla demo: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("refinevla demo: interrupted; finished stages are kept - rerun the same command to continue",
              file=sys.stderr)
        return 130
    if result.get("report"):
        print(f"\nreport: {result['report']}")
    return 0
