"""pip install of the ROS-free library and the `refinevla` CLI (training servers, notebooks).

The ROS 2 package (messages, nodes, launch files) is built by CMakeLists.txt: colcon with a system ROS 2, or
./setup.sh with the pip ROS wheels.
"""

import configparser
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildWithPresets(build_py):
    """Ship config/*.yaml inside the wheel as refinevla_core/presets/, so `refinevla train --config train_tiny` and the
    demo find their presets from any folder after a plain `pip install` (refinevla_core.config.CONFIG_DIRS)."""

    def run(self) -> None:
        super().run()
        presets = Path(self.build_lib) / "refinevla_core" / "presets"
        presets.mkdir(parents=True, exist_ok=True)
        for path in sorted(Path(__file__).resolve().parent.joinpath("config").glob("*.yaml")):
            shutil.copy2(path, presets / path.name)


# Node launchers on the venv's PATH: the ROS nodes without a system ROS 2 (`ros2 run` needs one). Each takes the usual
# `--ros-args ...` plus the shorthand `--params-file NAME_OR_PATH` (refinevla_ros.launchers).
NODE_SCRIPTS = [
    f"refinevla-{name.replace('_', '-')}-node = refinevla_ros.launchers:{name}_node"
    for name in ("policy", "sim_bridge", "widowx", "observation_check")
] + ["refinevla-topic = refinevla_ros.topic_cli:main"]


def ros_plugins() -> dict[str, list[str]]:
    """What the ROS package adds to the `refinevla` command (entry point groups read by refinevla_core.plugins, so
    refinevla_core never names refinevla_ros), from refinevla_ros/entry_points.cfg: colcon installs read it too."""
    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parent / "refinevla_ros" / "entry_points.cfg")
    return {group: [line.strip() for line in value.splitlines() if line.strip()]
            for group, value in cfg["options.entry_points"].items()}


setup(
    name="refinevla",
    version="0.1.0",
    description="ReFineVLA: reasoning-aware teacher-guided transfer fine-tuning of VLAs, with ROS 2 nodes",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["refinevla_core", "refinevla_core.*", "refinevla_ros", "refinevla_ros.*"]),
    package_data={"refinevla_core": ["presets/*.yaml", "py.typed"]},
    install_requires=[
        # torch first, from the right index: ./setup.sh installs torch==2.13.0 (CPU) before this line is read
        "torch>=2.4",
        "numpy>=1.26",
        "pyyaml>=6",
        "pillow>=10",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "safetensors>=0.4",
        "transformers>=5.20,<6",
        "tokenizers>=0.21",
        "peft>=0.17",
        "accelerate>=1.0",
        "rosbags>=0.11",
        "pyarrow>=15",
        "httpx>=0.27",
        "av>=12",  # LeRobot datasets store frames as mp4
    ],
    extras_require={
        "sim": ["mani-skill==3.0.1", "sapien==3.0.3"],
        # report_to=tensorboard writes through tensorboardX (~3 MB with protobuf; `tensorboard` itself, ~60 MB with
        # grpc, is only needed to view the curves); wandb / trackio: install them to use them
        "track": ["tensorboardX>=2.6"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "ruff>=0.8", "tensorboardX>=2.6"],
    },
    cmdclass={"build_py": BuildWithPresets},
    entry_points={"console_scripts": ["refinevla = refinevla_core.cli:main", *NODE_SCRIPTS], **ros_plugins()},
)
