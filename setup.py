"""pip install of the ROS-free library and the `refinevla` CLI (training servers, notebooks).

The ROS 2 package (messages, nodes, launch files) is built by CMakeLists.txt: colcon with a system ROS 2, or
./setup.sh with the pip ROS wheels.
"""

from setuptools import find_packages, setup

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
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "ruff>=0.8"],
    },
    entry_points={"console_scripts": ["refinevla = refinevla_core.cli:main"]},
)
