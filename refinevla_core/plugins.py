"""Entry points through which an installed package adds ROS-side commands, benchmarks, evaluation backends and demo
lanes to the `refinevla` command, so this ROS-free library never names the package that provides them (setup.py
registers the ROS package's; any other package may register its own).

Groups: refinevla.commands (a module with add_arguments/run), refinevla.benches (a module with add_arguments/run),
refinevla.eval_backends (a callable), refinevla.demo_lanes (a module run as `python -m MODULE --spec FILE`).

Why not `importlib.metadata.entry_points(group=...)`: it keeps one distribution per name, and the ROS message package
that colcon/./setup.sh installs is also called "refinevla" (without entry points); whichever is found first would
hide the other's entry points. Every distribution is read here.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from typing import Any

COMMANDS = "refinevla.commands"
BENCHES = "refinevla.benches"
EVAL_BACKENDS = "refinevla.eval_backends"
DEMO_LANES = "refinevla.demo_lanes"
INSTALL_HINT = "run ./setup.sh and `source .venv/refinevla_env.sh`"


class PluginMissingError(RuntimeError):
    """No installed package provides the entry point (or its module cannot be found)."""


def entry_point(group: str, name: str) -> importlib.metadata.EntryPoint | None:
    """The entry point `name` of `group` from any installed distribution, when its module can be found (never
    imported here), or None."""
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points:
            if ep.group == group and ep.name == name and _findable(ep.module):
                return ep
    return None


def _findable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def plugin_module(group: str, name: str) -> str | None:
    """The module the entry point names (not imported), or None."""
    ep = entry_point(group, name)
    return None if ep is None else ep.module


def require(group: str, name: str, what: str) -> importlib.metadata.EntryPoint:
    """The entry point, or PluginMissingError saying that `what` needs the ROS side installed."""
    ep = entry_point(group, name)
    if ep is None:
        raise PluginMissingError(f"{what} needs the ReFineVLA ROS 2 package, which is not installed (no "
                                 f"importable {group} entry point {name!r}); {INSTALL_HINT}")
    return ep


def load(group: str, name: str, what: str) -> Any:
    """The object the entry point names (imported), or PluginMissingError as in `require`."""
    return require(group, name, what).load()
