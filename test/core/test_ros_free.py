"""refinevla_core must work where rclpy is absent (training servers, notebooks): import every module that way."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import refinevla_core

ROOT = Path(__file__).resolve().parents[2]

# A meta-path hook that makes `import rclpy` (and ROS message packages) fail, as on a machine without ROS.
BLOCK_ROS = """
import importlib.abc, sys
class _NoROS(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('rclpy', 'rcl_interfaces', 'sensor_msgs', 'std_msgs', 'builtin_interfaces',
                                  'refinevla'):
            raise ImportError(f'{name} is blocked: refinevla_core must not import ROS')
sys.meta_path.insert(0, _NoROS())
"""


def all_core_modules() -> list[str]:
    names = ["refinevla_core"]
    for info in pkgutil.walk_packages(refinevla_core.__path__, "refinevla_core."):
        if not info.name.endswith("__main__"):  # importing it would run the CLI
            names.append(info.name)
    return sorted(names)


def test_every_core_module_imports_without_ros():
    modules = all_core_modules()
    assert "refinevla_core.cli" in modules and "refinevla_core.rationale" in modules
    code = BLOCK_ROS + f"\nimport importlib\nfor m in {modules!r}:\n    importlib.import_module(m)\n"
    code += "\ntry:\n    import rclpy\nexcept ImportError:\n    pass\nelse:\n    raise SystemExit('rclpy importable')\n"
    code += "assert not [m for m in sys.modules if m.split('.')[0] in ('rclpy', 'refinevla_ros')]\nprint('ok')\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.strip().endswith("ok")


def test_blocker_really_blocks_rclpy():
    """The check above can fail: with the blocker, importing a module that uses rclpy raises."""
    code = BLOCK_ROS + "\nimport refinevla_ros.observation_check_node\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode != 0
    assert "blocked" in r.stderr


def test_no_core_module_imports_ros_even_lazily():
    """Function-level imports escape the import test above; the source must not name rclpy or ROS messages at all.
    (Core code may hand over to refinevla_ros, e.g. `refinevla eval --via ros`; refinevla_ros owns the rclpy code.)"""
    import ast

    ros_packages = {"rclpy", "rcl_interfaces", "sensor_msgs", "std_msgs", "std_srvs", "builtin_interfaces",
                    "diagnostic_msgs", "refinevla"}
    offenders = []
    for path in sorted((ROOT / "refinevla_core").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                          if n.split(".")[0] in ros_packages]
    assert not offenders, offenders
