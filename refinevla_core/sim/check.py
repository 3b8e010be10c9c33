"""`python -m refinevla_core.sim.check`: does the simulator render here? Run by ./setup.sh.

Exists because the usual failure is not Python but Vulkan (no driver, or an old Mesa whose llvmpipe has no Vulkan
1.3): this check turns those into one message naming the fix.
"""

from __future__ import annotations

import os
import sys
import time
import warnings

VULKAN_HELP = (
    "ManiSkill3 could not create a Vulkan device. On a CPU-only machine run ./setup.sh (it unpacks Mesa 25 lavapipe "
    "into .venv/lavapipe) and `source .venv/refinevla_env.sh` so VK_ICD_FILENAMES points at it; on a GPU machine "
    "install the NVIDIA driver's Vulkan ICD and unset VK_ICD_FILENAMES."
)


def render_once(task: str = "PickCube-v1", size: int = 64) -> dict:
    """Make the env, reset, take one zero step, return the image statistics. Raises RuntimeError(VULKAN_HELP)."""
    warnings.filterwarnings("ignore")
    try:
        import gymnasium as gym
        import mani_skill.envs  # noqa: F401  (registers the tasks)
        import numpy as np
    except ImportError as e:
        raise RuntimeError(f"ManiSkill3 is not installed ({e}); run ./setup.sh (WITH_SIM=1, the default)") from e
    t0 = time.perf_counter()
    try:
        env = gym.make(task, obs_mode="rgb", control_mode="pd_ee_delta_pose", sim_backend="physx_cpu",
                       render_backend="cpu", sensor_configs=dict(width=size, height=size))
        obs, _ = env.reset(seed=0)
        obs, *_ = env.step(np.zeros(7, np.float32))
    except RuntimeError as e:
        raise RuntimeError(f"{VULKAN_HELP}\n(original error: {e})") from e
    rgb = obs["sensor_data"]["base_camera"]["rgb"][0].numpy()
    env.close()
    if rgb.std() == 0:
        raise RuntimeError(f"the simulator rendered a blank image; {VULKAN_HELP}")
    return {"task": task, "shape": rgb.shape, "std": float(rgb.std()), "seconds": time.perf_counter() - t0,
            "vk_icd": os.environ.get("VK_ICD_FILENAMES", "(system)")}


def main() -> int:
    try:
        info = render_once()
    except RuntimeError as e:
        print(f"[sim check] FAILED: {e}", file=sys.stderr)
        return 1
    print(f"[sim check] ok: {info['task']} rendered {info['shape']} in {info['seconds']:.1f} s (Vulkan ICD: "
          f"{info['vk_icd']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
