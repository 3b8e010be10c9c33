"""The `refinevla` command: one subcommand per pipeline stage, each a thin wrapper around a core module.

Every subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``, so stages are
added without touching this file's logic. A stage that is not built yet says so and exits non-zero: nothing here
pretends to work.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from refinevla_core import __version__

EXIT_NOT_BUILT = 3


@dataclass(frozen=True)
class Subcommand:
    module: str
    help: str
    issue: int  # the project issue that builds it; named in the "not built yet" message


SUBCOMMANDS: dict[str, Subcommand] = {
    "annotate": Subcommand("refinevla_core.annotation.cli", "write teacher rationales for a dataset's frames", 4),
    "collect": Subcommand("refinevla_core.sim.collect", "record scripted-expert episodes in the simulator", 8),
    "convert": Subcommand("refinevla_core.data.convert", "turn ROS 2 bags / LeRobot datasets into episodes", 9),
    "train": Subcommand("refinevla_core.training.cli", "selective-transfer fine-tuning with the joint loss", 6),
    "eval": Subcommand("refinevla_core.eval.cli", "closed-loop evaluation with success rates and a report", 8),
    "attention": Subcommand("refinevla_core.attention_cli", "attention map of action tokens over image patches", 5),
    "demo": Subcommand("refinevla_core.demo", "collect -> annotate -> train -> evaluate -> report, end to end", 9),
    "record": Subcommand("refinevla_ros.record", "record camera, instruction and actions from ROS 2 to a bag", 9),
    "bench": Subcommand("refinevla_core.bench", "benchmarks writing JSON + Markdown under benchmarks/", 3),
}


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def _selected_command(argv: Sequence[str]) -> str | None:
    """The subcommand named on the command line (the first token that is not an option), if any."""
    for token in argv:
        if not token.startswith("-"):
            return token
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; only `command`'s module is imported (for its arguments), so `refinevla --help` stays fast
    and one stage's broken import cannot take the other stages down with it."""
    parser = argparse.ArgumentParser(
        prog="refinevla",
        description="ReFineVLA: teacher rationales, selective-transfer fine-tuning, VLA inference, ROS 2 and sim.",
    )
    parser.add_argument("--version", action="version", version=f"refinevla {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, spec in SUBCOMMANDS.items():
        built = _module_exists(spec.module)
        p = sub.add_parser(
            name,
            help=spec.help if built else f"{spec.help} [not built yet: issue #{spec.issue}]",
            description=spec.help,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if built and name == command:
            importlib.import_module(spec.module).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_selected_command(argv))
    args, unknown = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    spec = SUBCOMMANDS[args.command]
    if not _module_exists(spec.module):
        print(
            f"refinevla {args.command}: not built yet (planned in issue #{spec.issue}); "
            "nothing was run.",
            file=sys.stderr,
        )
        return EXIT_NOT_BUILT
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return int(importlib.import_module(spec.module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
