"""The layers the imports show: refinevla_core never imports nor names the ROS package or the ROS client library,
and what the ROS package adds to the `refinevla` command arrives through entry points that resolve.

test_ros_free.py checks that every core module imports with ROS blocked; this checks the source itself, so a lazy
import inside a function, an `importlib.import_module("...")` string or a `python -m ...` command cannot slip by.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from refinevla_core import plugins

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "refinevla_core"
ROS_PACKAGE = "refinevla_ros"
ROS_CLIENT = "rclpy"


def core_sources() -> list[Path]:
    paths = sorted(CORE.rglob("*.py"))
    assert len(paths) > 50 and CORE / "cli.py" in paths
    return paths


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (prose may explain what the core is not)."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def code_mentions(source: str, name: str) -> list[int]:
    """Lines where code (imports, names, attributes, strings that are not docstrings) mentions `name`."""
    tree = ast.parse(source)
    docs = _docstrings(tree)
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            hit = any(a.name.split(".")[0] == name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            hit = node.level == 0 and (node.module or "").split(".")[0] == name
        elif isinstance(node, ast.Name):
            hit = node.id == name
        elif isinstance(node, ast.Attribute):
            hit = node.attr == name
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            hit = id(node) not in docs and name in node.value
        else:
            hit = False
        if hit:
            lines.append(node.lineno)
    return lines


@pytest.mark.parametrize("name", [ROS_PACKAGE, ROS_CLIENT])
def test_no_core_code_imports_or_names_ros(name):
    offenders = [f"{path.relative_to(ROOT)}:{line}" for path in core_sources()
                 for line in code_mentions(path.read_text(), name)]
    assert not offenders, f"refinevla_core code names {name}: {offenders}"


def test_not_even_a_comment_or_docstring_names_the_ros_package():
    """`grep -rn refinevla_ros refinevla_core` prints nothing: the core describes the ROS side without naming it."""
    offenders = [f"{path.relative_to(ROOT)}:{i}" for path in core_sources()
                 for i, line in enumerate(path.read_text().splitlines(), 1) if ROS_PACKAGE in line]
    assert not offenders, offenders


def test_the_checks_can_fail():
    """The detector finds each way of naming the ROS side, and leaves docstrings alone."""
    source = '''"""Docstring about rclpy."""
import os
def f():
    """rclpy again, in a docstring."""
    from rclpy.node import Node
    import refinevla_ros.record
    os.system("python -m refinevla_ros.demo_eval")
    return refinevla_ros, x.rclpy
'''
    assert sorted(set(code_mentions(source, ROS_PACKAGE))) == [6, 7, 8]
    assert sorted(set(code_mentions(source, ROS_CLIENT))) == [5, 8]


@pytest.mark.parametrize(("group", "name", "attribute"), [
    (plugins.COMMANDS, "record", "run"),
    (plugins.BENCHES, "ros", "run"),
    (plugins.BENCHES, "sim", "run"),
    (plugins.BENCHES, "record", "run"),
    (plugins.EVAL_BACKENDS, "ros", None),
    (plugins.DEMO_LANES, "ros", "main"),
])
def test_the_ros_entry_points_resolve(group, name, attribute):
    """Installed with the package (./setup.sh, or pip install -e .): each names an importable module with what the
    core calls (a command's or benchmark's run, the lane's main, the evaluation backend itself)."""
    ep = plugins.entry_point(group, name)
    assert ep is not None, f"{group} {name!r} is not registered: reinstall the package (./setup.sh)"
    assert ep.module.startswith(f"{ROS_PACKAGE}.")
    target = ep.load()
    assert callable(getattr(target, attribute) if attribute else target)
    assert importlib.import_module(ep.module) is not None


def test_a_missing_plugin_says_what_to_install():
    with pytest.raises(plugins.PluginMissingError, match=r"--via ros needs the ReFineVLA ROS 2 package.*setup\.sh"):
        plugins.load(plugins.EVAL_BACKENDS, "no_such_backend", "--via ros")
    assert plugins.plugin_module(plugins.BENCHES, "no_such_bench") is None
