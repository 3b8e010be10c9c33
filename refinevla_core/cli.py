"""The `refinevla` command: one subcommand per pipeline stage, each a thin wrapper around a core module.

Every subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``, so stages are
added without touching this file's logic. Commands that need ROS 2 come from the ROS package through the
`refinevla.commands` entry points (refinevla_core.plugins), so this ROS-free library never names it. A stage that is
not built (or not installed) yet says so and exits non-zero: nothing here pretends to work.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from refinevla_core import __version__
from refinevla_core.plugins import COMMANDS, plugin_module

EXIT_NOT_BUILT = 3


@dataclass(frozen=True)
class Subcommand:
    module: str
    help: str
    issue: int  # the project issue that builds it; named in the "not built yet" message
    plugin: str = ""  # set: the module is the `refinevla.commands` entry point of this name (the ROS package's)

    def resolve(self) -> str | None:
        """The module implementing the command, when it is installed (not imported here)."""
        if self.plugin:
            return plugin_module(COMMANDS, self.plugin)
        return self.module if _module_exists(self.module) else None


SUBCOMMANDS: dict[str, Subcommand] = {
    "annotate": Subcommand("refinevla_core.annotation.cli", "write teacher rationales for a dataset's frames", 4),
    "collect": Subcommand("refinevla_core.sim.collect", "record scripted-expert episodes in the simulator", 8),
    "convert": Subcommand("refinevla_core.data.convert", "turn ROS 2 bags / LeRobot datasets into episodes", 9),
    "train": Subcommand("refinevla_core.training.cli", "selective-transfer fine-tuning with the joint loss", 6),
    "eval": Subcommand("refinevla_core.eval.cli", "closed-loop evaluation with success rates and a report", 8),
    "attention": Subcommand("refinevla_core.attention_cli", "attention map of action tokens over image patches", 5),
    "demo": Subcommand("refinevla_core.demo", "collect -> annotate -> train -> evaluate -> report, end to end", 9),
    "record": Subcommand("", "record camera, instruction and actions from ROS 2 to a bag", 9, plugin="record"),
    "bench": Subcommand("refinevla_core.bench", "benchmarks writing JSON + Markdown under benchmarks/", 3),
}


TOP_LEVEL_EXAMPLES = """\
examples:
  refinevla demo --quick                                   # the whole loop in ~3 minutes
  refinevla collect --task PushCube-v1 --episodes 50 --out data/pushcube
  refinevla annotate --dataset data/pushcube --teacher sim
  refinevla train --config train_tiny dataset=data/pushcube output_dir=runs/tiny
  refinevla eval --checkpoint runs/tiny/final --episodes 20
  refinevla COMMAND --help                                 # each command's options and examples

ROS 2 nodes without a system ROS 2: refinevla-policy-node, refinevla-sim-bridge-node, refinevla-widowx-node,
refinevla-topic (see the README, "Without a system ROS 2").
"""

# Examples shown under each subcommand's --help (a module may set its own parser.epilog instead).
EXAMPLES: dict[str, str] = {
    "collect": """\
  refinevla collect --task PushCube-v1 --episodes 50 --out data/pushcube
  refinevla collect --task PushCube-v1 PickCube-v1 --episodes 100 --noise-fraction 0.3 --out data/mixed""",
    "convert": """\
  refinevla convert --bag bags/run1 bags/run2 --out data/widowx
  refinevla convert --bag bags/run1 --out data/widowx --set image_topic=/wrist/image_raw --drop-bad-frames
  refinevla convert --lerobot ~/lerobot/bridge --out data/bridge --set image_key=observation.images.image_0""",
    "eval": """\
  refinevla eval --checkpoint runs/tiny/final --tasks PushCube-v1 --episodes 30 --out eval/tiny
  refinevla eval --policy expert --tasks PushCube-v1 PickCube-v1 --episodes 20
  refinevla eval --checkpoint runs/tiny/final --via ros-policy-node   # sim_bridge_node + policy_node processes
  refinevla eval --compare eval/a/report.json eval/b/report.json""",
    "attention": """\
  refinevla attention --checkpoint runs/tiny/final --image frame.png --instruction "push the cube" --out attn.png
  refinevla attention --checkpoint runs/tiny/final --image frame.npy --instruction "push the cube" \\
      --layers all --with-rationale --out attn_all.png""",
    "demo": """\
  refinevla demo --quick                                   # mechanics only, ~3 min -> runs/demo_quick
  refinevla demo                                           # the full demo, ~25 min on 2 cores -> runs/demo
  refinevla demo --set train.max_steps=400 --set eval.episodes=30 --out runs/demo_400""",
    "record": """\
  refinevla record --out bags/run1                         # the topics of config/bag_topics.yaml, until Ctrl-C
  refinevla record --out bags/run2 --duration 60 --format sqlite3""",
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


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that tells which options and subcommands it knows (argparse keeps both private), for the
    "unknown option, did you mean" check. Its subparsers are Parsers too."""

    def known_options(self) -> list[str]:
        return list(self._option_string_actions)

    def arguments(self) -> list[argparse.Action]:
        """Every argument and option it declares (for the help checks in the tests)."""
        return list(self._actions)

    def subcommands(self) -> dict[str, argparse.ArgumentParser]:
        for action in self._actions:
            if action.nargs == argparse.PARSER:
                return dict(action.choices or {})
        return {}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; only `command`'s module is imported (for its arguments), so `refinevla --help` stays fast
    and one stage's broken import cannot take the other stages down with it."""
    parser = Parser(
        prog="refinevla",
        description="ReFineVLA: teacher rationales, selective-transfer fine-tuning, VLA inference, ROS 2 and sim.",
        epilog=TOP_LEVEL_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"refinevla {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, spec in SUBCOMMANDS.items():
        module = spec.resolve()
        built = module is not None
        p = sub.add_parser(
            name,
            help=spec.help if built else f"{spec.help} [not built yet: issue #{spec.issue}]",
            description=spec.help,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if module is not None and name == command:
            importlib.import_module(module).add_arguments(p)
            if not p.epilog and name in EXAMPLES:
                p.epilog = "examples:\n" + EXAMPLES[name]
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return parser.subcommands() if isinstance(parser, Parser) else {}


def unknown_option(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[argparse.ArgumentParser, str] | None:
    """The first option no parser on the way knows, with the parser it was given to, so `--confg` is reported as
    unknown (and its near miss named) instead of as a missing `--config` or under the top-level usage."""
    current = parser
    for token in argv:
        if token == "--":
            return None
        if token.startswith("-") and len(token) > 1 and not token[1].isdigit():
            option = token.split("=", 1)[0]
            known = current.known_options() if isinstance(current, Parser) else []
            if option not in known and not (option.startswith("--") and any(k.startswith(option) for k in known)):
                return current, option
        elif token in _subparsers(current):
            current = _subparsers(current)[token]
    return None


def _did_you_mean(option: str, parser: argparse.ArgumentParser) -> str:
    known = parser.known_options() if isinstance(parser, Parser) else []
    close = difflib.get_close_matches(option, [o for o in known if o.startswith("--")], n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_selected_command(argv))
    if _selected_command(argv) in SUBCOMMANDS and SUBCOMMANDS[_selected_command(argv)].resolve():
        bad = unknown_option(parser, argv)
        if bad is not None:
            owner, option = bad
            owner.error(f"unknown option {option}{_did_you_mean(option, owner)}")
    args, unknown = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    spec = SUBCOMMANDS[args.command]
    module = spec.resolve()
    if module is None:
        print(
            f"refinevla {args.command}: not built yet (planned in issue #{spec.issue}); "
            "nothing was run.",
            file=sys.stderr,
        )
        return EXIT_NOT_BUILT
    if unknown:
        _subparsers(parser)[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return int(importlib.import_module(module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
