"""Imports inside functions are only for modules worth deferring; everything else goes to the module top.

Why: a function-level import hides a dependency from the reader and from ruff's import sorting, and it is paid on
the first call instead of at start-up; that trade is worth it only where the import is slow (torch, transformers, ...)
or may be missing (ROS 2 packages exist only in a sourced ROS environment, ManiSkill only with the `sim` extra), so
that light modules and `refinevla --help` start fast and a missing extra fails only the command that needs it. ruff's
PLC0415 cannot tell those cases apart, so it stays off (pyproject.toml) and this test enforces the allow-list:

For every function-level import in refinevla_core/ and refinevla_ros/ (read with `ast`; `if TYPE_CHECKING:` blocks
never run and are skipped), the imported module must be
- a heavy third-party module (HEAVY_THIRD_PARTY, with the measured cost), or an optional one (ROS_ONLY, OPTIONAL), or
- a project module whose module-level imports (through other project modules and their parent packages, the same
  walk as test_import_graph) reach such a module,
and the import must defer something: if the enclosing module already loads that heavy module at its own module level,
the function-level import saves nothing and belongs at the top.

Costs measured on the project machine (2 shared cores, under load), cumulative time of the last line of
`python -X importtime -c "import X"`, 2026-12-03:
    torch 1240 ms, transformers 791, accelerate 1687, peft 4266, safetensors.torch 1344, matplotlib.pyplot 526
    (matplotlib 213), pyarrow.parquet 204, gymnasium 205, numpy 125, tqdm.auto 85 (tqdm 37), rclpy 85,
    sensor_msgs.msg 120, rosbags.rosbag2 72 (rosbags.typesys 27), av 65, PIL.Image 25;
    light (moved to the top where they were inside functions): tokenizers 14, yaml 14, json 1.4, copy 0.8,
    resource 0.2, warnings and types (already loaded by the interpreter).
The threshold is 20 ms: about what the interpreter's own start-up costs, so below it deferring is noise.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from test.core.test_import_graph import ROOT, _imported_names, project_modules

PACKAGES = ("refinevla_core", "refinevla_ros")

# top-level package -> measured import cost in ms (see the module docstring)
HEAVY_THIRD_PARTY = {
    "torch": 1240, "transformers": 791, "accelerate": 1687, "peft": 4266, "safetensors": 1344, "matplotlib": 526,
    "pyarrow": 204, "gymnasium": 205, "numpy": 125, "tqdm": 85, "rosbags": 72, "av": 65, "PIL": 25,
}
# present only in a sourced ROS 2 environment (refinevla is the package's generated messages)
ROS_ONLY = {
    "rclpy", "sensor_msgs", "std_msgs", "std_srvs", "geometry_msgs", "builtin_interfaces", "rosidl_runtime_py",
    "refinevla", "launch", "launch_ros", "ament_index_python", "interbotix_common_modules", "interbotix_xs_modules",
}
# optional extras (setup.py extras_require, or installed by the user to use a feature)
OPTIONAL = {"mani_skill", "sapien", "simpler_env", "tensorboardX", "wandb", "trackio"}
DEFERRABLE = set(HEAVY_THIRD_PARTY) | ROS_ONLY | OPTIONAL


@dataclass(frozen=True)
class LazyImport:
    path: Path
    line: int
    names: tuple[str, ...]  # what _imported_names gives: the module and, for `from x import y`, x.y too
    text: str


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def split_imports(tree: ast.AST) -> tuple[list[ast.AST], list[ast.AST]]:
    """(module-level imports, function-level imports); class bodies run at import time and count as module
    level, `if TYPE_CHECKING:` blocks never run and count as neither."""
    module_level, in_functions = [], []
    stack: list[tuple[ast.AST, bool]] = [(tree, False)]
    while stack:
        node, in_function = stack.pop()
        if _is_type_checking(node):
            stack.extend((child, in_function) for child in node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            (in_functions if in_function else module_level).append(node)
        deeper = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        stack.extend((child, deeper) for child in ast.iter_child_nodes(node))
    return module_level, in_functions


class ImportMap:
    """The project's modules and, per module, the deferrable third-party packages its module-level imports load
    (directly or through project modules and their parent packages)."""

    def __init__(self, root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> None:
        self.modules: dict[str, Path] = {}
        for package in packages:
            self.modules.update(project_modules(root, package))
        self.root, self.packages = root, packages
        self._direct: dict[str, tuple[set[str], set[str]]] = {}  # module -> (project modules, third-party roots)
        self._closure: dict[str, set[str]] = {}

    def resolve(self, names: tuple[str, ...] | list[str], module: str = "") -> tuple[set[str], set[str]]:
        """(project modules an import statement runs, including parent packages; third-party top-level names)."""
        project, third_party = set(), set()
        for name in names:
            if name.split(".")[0] not in self.packages:
                if name:
                    third_party.add(name.split(".")[0])
                continue
            found = name
            while found and found not in self.modules:
                found = found.rpartition(".")[0]
            while found:  # the module and every package above it
                if found != module:
                    project.add(found)
                found = found.rpartition(".")[0]
        return project, third_party

    def direct(self, module: str) -> tuple[set[str], set[str]]:
        if module not in self._direct:
            path = self.modules[module]
            module_level, _ = split_imports(ast.parse(path.read_text(), str(path)))
            project, third_party = set(), set()
            for node in module_level:
                p, t = self.resolve(_imported_names(node, module, path.name == "__init__.py"), module)
                project |= p
                third_party |= t
            parents = module.split(".")
            project |= {".".join(parents[:i]) for i in range(1, len(parents))} - {module}
            self._direct[module] = (project, third_party)
        return self._direct[module]

    def heavy_loaded_by(self, module: str) -> set[str]:
        """The deferrable third-party packages that importing `module` loads."""
        if module not in self._closure:
            seen, todo, found = {module}, [module], set()
            while todo:
                project, third_party = self.direct(todo.pop())
                found |= third_party & DEFERRABLE
                todo.extend(m for m in project if m not in seen)
                seen |= project
            self._closure[module] = found
        return self._closure[module]

    def function_level_imports(self, module: str) -> list[LazyImport]:
        path = self.modules[module]
        _, in_functions = split_imports(ast.parse(path.read_text(), str(path)))
        return [LazyImport(path, node.lineno, tuple(_imported_names(node, module, path.name == "__init__.py")),
                           ast.unparse(node)) for node in sorted(in_functions, key=lambda n: n.lineno)]

    def why_not_deferrable(self, module: str, lazy: LazyImport) -> str | None:
        """None when `lazy` defers a heavy or optional module the enclosing module does not load anyway, else why
        it belongs at the top."""
        project, third_party = self.resolve(lazy.names, module)
        deferred = third_party & DEFERRABLE
        for target in project:
            deferred |= self.heavy_loaded_by(target)
        if not deferred:
            return "light: move it to the module top (or add a measured heavy module to this test's lists)"
        already = self.heavy_loaded_by(module)
        if deferred <= already:
            return f"defers nothing: {module} already loads {', '.join(sorted(deferred))} at module level"
        return None


def offenders(imports: ImportMap) -> list[str]:
    found = []
    for module in sorted(imports.modules):
        for lazy in imports.function_level_imports(module):
            reason = imports.why_not_deferrable(module, lazy)
            if reason is not None:
                found.append(f"{lazy.path.relative_to(imports.root)}:{lazy.line}: `{lazy.text}`: {reason}")
    return found


def test_function_level_imports_defer_only_heavy_or_optional_modules():
    found = offenders(ImportMap())
    assert not found, "function-level imports that should be at the module top:\n" + "\n".join(found)


def _tiny_project(tmp_path: Path, files: dict[str, str]) -> ImportMap:
    for name, text in files.items():
        path = tmp_path / "refinevla_core" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return ImportMap(tmp_path, ("refinevla_core",))


def test_negative_control_light_and_pointless_lazy_imports_are_reported(tmp_path):
    imports = _tiny_project(tmp_path, {
        "__init__.py": "",
        "light.py": "import json\n\ndef f():\n    import json as j\n    import copy\n    return j, copy\n",
        "heavy.py": "import torch\n\ndef g():\n    import torch.nn\n    return torch.nn\n",
        "user.py": ("def h():\n    from refinevla_core import light\n    from refinevla_core.heavy import g\n"
                    "    import rclpy\n    return light, g, rclpy\n"),
    })
    found = offenders(imports)
    assert len(found) == 4, found
    assert found[0].startswith("refinevla_core/heavy.py:4: `import torch.nn`: defers nothing"), found
    assert found[1].startswith("refinevla_core/light.py:4: `import json as j`: light"), found
    assert found[2].startswith("refinevla_core/light.py:5: `import copy`: light"), found
    assert found[3].startswith("refinevla_core/user.py:2: `from refinevla_core import light`: light"), found


def test_a_project_module_is_heavy_through_its_module_level_imports(tmp_path):
    imports = _tiny_project(tmp_path, {
        "__init__.py": "",
        "a.py": "from refinevla_core import b\n\ndef f():\n    import json\n",
        "b.py": "from __future__ import annotations\nfrom typing import TYPE_CHECKING\nfrom refinevla_core.c import x\n"
                "if TYPE_CHECKING:\n    import peft\n",
        "c.py": "import numpy\nx = 1\n\ndef later():\n    import matplotlib\n",
    })
    assert imports.heavy_loaded_by("refinevla_core.a") == {"numpy"}, "TYPE_CHECKING and function bodies don't count"
    assert imports.heavy_loaded_by("refinevla_core.c") == {"numpy"}
