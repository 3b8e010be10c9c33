"""The ROS 2 package as colcon would build it: interfaces + both Python packages + node executables + launch/config.

./setup.sh builds only the interfaces (the Python code is installed editable); this test builds the full package
(REFINEVLA_INSTALL_PYTHON=ON, the default for colcon) into a temporary prefix and checks what `ros2 run` /
`ros2 launch` need is where they look for it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_PARTS = ["package.xml", "CMakeLists.txt", "msg", "srv", "refinevla_core", "refinevla_ros", "scripts",
                 "launch", "config"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    if shutil.which("cmake") is None or shutil.which("ninja") is None:
        pytest.skip("cmake/ninja missing: run ./setup.sh")
    src = tmp_path_factory.mktemp("src") / "refinevla"
    src.mkdir()
    for part in PACKAGE_PARTS:  # a copy: CMake refuses include paths inside the source tree (the .venv is there)
        p = ROOT / part
        if p.is_dir():
            shutil.copytree(p, src / part, ignore=shutil.ignore_patterns("__pycache__"))
        elif p.exists():
            shutil.copy2(p, src / part)
    build, prefix = src.parent / "build", src.parent / "install"
    venv = Path(sys.prefix)
    env = {**os.environ, "CMAKE_PREFIX_PATH": str(venv), "AMENT_PREFIX_PATH": str(venv),
           "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    for cmd in (
        ["cmake", "-S", str(src), "-B", str(build), "-G", "Ninja", "-DBUILD_TESTING=OFF",
         f"-DCMAKE_INSTALL_PREFIX={prefix}", f"-DPython3_EXECUTABLE={sys.executable}"],
        ["cmake", "--build", str(build)],
        ["cmake", "--install", str(build)],
    ):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return prefix


def test_executables_launch_and_config_are_installed(installed):
    scripts = sorted(p.name for p in (ROOT / "scripts").iterdir())
    assert scripts, "scripts/ holds the node executables"
    for name in scripts:
        exe = installed / "lib" / "refinevla" / name
        assert exe.is_file() and os.access(exe, os.X_OK), exe
    for part in ("launch", "config"):
        if (ROOT / part).is_dir():
            for f in (ROOT / part).iterdir():
                if f.is_file():
                    assert (installed / "share" / "refinevla" / part / f.name).is_file(), f
    assert (installed / "share" / "ament_index" / "resource_index" / "packages" / "refinevla").is_file()


def test_installed_python_packages_import_from_the_prefix(installed):
    site = installed / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    code = ("import refinevla_core, refinevla_ros, refinevla.msg as m, refinevla.srv as s;"
            "print(refinevla_core.__file__, refinevla_ros.__file__, m.__file__, s.ResetEpisode)")
    env = {**os.environ, "PYTHONPATH": str(site), "LD_LIBRARY_PATH": f"{installed / 'lib'}"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/", timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    paths = r.stdout.split()[:3]
    assert all(p.startswith(str(installed)) for p in paths), paths


def test_the_ros_package_registers_its_entry_points_in_the_prefix(installed):
    """What the ROS package adds to `refinevla` (record, the ROS benches, eval --via ros*, the demo's lanes) is found
    through entry points (refinevla_core.plugins); a colcon install registers the same ones as pip install."""
    import configparser
    import importlib.metadata

    site = installed / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    (info,) = site.glob("refinevla_ros-*.egg-info")
    registered = {(ep.group, ep.name, ep.value) for ep in importlib.metadata.PathDistribution(info).entry_points}
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "refinevla_ros" / "entry_points.cfg")
    listed = {(group, *(part.strip() for part in line.split("=", 1)))
              for group, value in cfg["options.entry_points"].items() for line in value.splitlines() if line.strip()}
    assert len(listed) == 6 and ("refinevla.eval_backends", "ros", "refinevla_ros.sim_eval_client:evaluate_via_ros") \
        in listed
    assert registered == listed
