"""SimplerEnv (WidowX Bridge and Google robot tasks, ManiSkill2-real2sim) behind the SimBackend interface.

The paper reports SimplerEnv numbers, so the real code path is here: `simpler_env.make(name)` with its prepackaged
visual-matching configs, its own controllers and its own conventions, converted from ours exactly as SimplerEnv's
policy wrappers do (simpler_env/policies/octo/octo_model.py):

    Bridge (ours)                       SimplerEnv step action (raw, not normalised)
    dx, dy, dz  m                       world_vector, same metres, robot-base axes
    droll, dpitch, dyaw  rad            rot_axangle = transforms3d euler2axangle(roll, pitch, yaw) (static xyz:
                                        R = Rz Ry Rx, the Bridge composition), as an axis * angle vector
    gripper 1 open / 0 closed           WidowX: 2 * (g > 0.5) - 1 (+1 open, -1 close, absolute)
                                        Google robot: relative, previous - current (+1 close, -1 open), sticky
                                        for 15 steps, as SimplerEnv's Octo/RT-1 wrappers do

Episodes: `reset(seed)` uses the seed as SimplerEnv's `episode_id` (object configuration; 24 per Bridge task), the
convention of its scripts (`--obj-episode-range 0 24`). Images come at the task's native camera size (640x480 for
WidowX's 3rd_view_camera); policies resize them as in SimplerEnv. Success is the task's own `info["success"]`.

It cannot run on this project's CPU machines (SimplerEnv needs its assets and a Vulkan GPU renderer); without
`simpler_env` every entry point raises SimError listing the install steps.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any

import numpy as np

from refinevla_core.gripper import bridge_to_simplerenv
from refinevla_core.sim.config import SimConfig
from refinevla_core.sim.interface import SimBackend, SimError, SimObservation, StepResult, validate_action
from refinevla_core.sim.maniskill import rpy_to_matrix


@dataclass(frozen=True)
class SimplerTask:
    env_id: str
    robot: str  # widowx | google_robot
    max_steps: int
    episodes: int  # trials per checkpoint in SimplerEnv's scripts
    instruction: str  # the env's own instruction, for tables and when the env is absent


SIMPLER_TASKS: dict[str, SimplerTask] = {
    "widowx_spoon_on_towel": SimplerTask("PutSpoonOnTableClothInScene-v0", "widowx", 60, 24,
                                         "put the spoon on the towel"),
    "widowx_carrot_on_plate": SimplerTask("PutCarrotOnPlateInScene-v0", "widowx", 60, 24, "put carrot on plate"),
    "widowx_stack_cube": SimplerTask("StackGreenCubeOnYellowCubeBakedTexInScene-v0", "widowx", 60, 24,
                                     "stack the green block on the yellow block"),
    "widowx_put_eggplant_in_basket": SimplerTask("PutEggplantInBasketScene-v0", "widowx", 120, 24,
                                                 "put eggplant into yellow basket"),
    "google_robot_pick_coke_can": SimplerTask("GraspSingleOpenedCokeCanInScene-v0", "google_robot", 80, 25,
                                              "pick coke can"),
    "google_robot_move_near": SimplerTask("MoveNearGoogleBakedTexInScene-v0", "google_robot", 80, 60,
                                          "move the object near the other object"),
    "google_robot_open_drawer": SimplerTask("OpenDrawerCustomInScene-v0", "google_robot", 113, 27, "open drawer"),
    "google_robot_close_drawer": SimplerTask("CloseDrawerCustomInScene-v0", "google_robot", 113, 27, "close drawer"),
    "google_robot_place_apple_in_closed_top_drawer": SimplerTask(
        "PlaceIntoClosedTopDrawerCustomInScene-v0", "google_robot", 200, 27, "place apple into top drawer"),
}

INSTALL_STEPS = """SimplerEnv is not installed, so the SimplerEnv tasks cannot run. To install it (a machine with an \
NVIDIA GPU and its Vulkan driver; SimplerEnv's scenes are not supported on CPU rendering):
  1. git clone https://github.com/simpler-env/SimplerEnv --recurse-submodules
  2. pip install -e SimplerEnv/ManiSkill2_real2sim
  3. pip install -e SimplerEnv
  4. export MS2_REAL2SIM_ASSET_DIR=$PWD/SimplerEnv/ManiSkill2_real2sim/data   (the scenes, robots and overlays)
  5. unset VK_ICD_FILENAMES   (use the GPU's Vulkan driver, not the CPU lavapipe from ./setup.sh)
Then: refinevla eval --tasks widowx_carrot_on_plate --episodes 24 ...  The ManiSkill3 tasks (PushCube-v1, \
PickCube-v1, StackCube-v1) need none of this."""

GOOGLE_STICKY_STEPS = 15


def is_simpler_task(task: str) -> bool:
    return task in SIMPLER_TASKS or task.startswith(("widowx_", "google_robot_"))


def simpler_available() -> bool:
    try:
        return importlib.util.find_spec("simpler_env") is not None
    except (ImportError, ValueError):
        return False


def import_simpler_env() -> Any:
    """`simpler_env`, or SimError with the install steps."""
    if not simpler_available():
        raise SimError(INSTALL_STEPS)
    try:
        return importlib.import_module("simpler_env")
    except ImportError as e:  # installed but a dependency (mani_skill2_real2sim, sapien 2) is missing
        raise SimError(f"simpler_env is installed but does not import ({e}).\n{INSTALL_STEPS}") from e


def euler_to_axis_angle(roll: float, pitch: float, yaw: float) -> np.ndarray:
    """Bridge roll-pitch-yaw (R = Rz Ry Rx) -> axis * angle vector, as transforms3d.euler.euler2axangle does."""
    m = rpy_to_matrix(roll, pitch, yaw)
    angle = float(np.arccos(np.clip((np.trace(m) - 1.0) / 2.0, -1.0, 1.0)))
    if angle < 1e-9:
        return np.zeros(3)
    if np.pi - angle < 1e-6:  # 180 degrees: m = 2 a a^T - I, read the axis off its largest diagonal entry
        k = int(np.argmax(np.diag(m)))
        axis = np.empty(3)
        axis[k] = np.sqrt((m[k, k] + 1.0) / 2.0)
        for j in {0, 1, 2} - {k}:
            axis[j] = m[k, j] / (2.0 * axis[k])
        return axis * angle
    axis = np.array([m[2, 1] - m[1, 2], m[0, 2] - m[2, 0], m[1, 0] - m[0, 1]]) / (2.0 * np.sin(angle))
    return axis * angle


class GripperConverter:
    """Absolute Bridge gripper (1 open, 0 closed) -> the robot's SimplerEnv gripper action."""

    def __init__(self, robot: str) -> None:
        self.robot = robot
        self.reset()

    def reset(self) -> None:
        self.previous: float | None = None
        self.sticky_on, self.sticky_value, self.repeat = False, 0.0, 0

    def __call__(self, g: float) -> float:
        if self.robot == "widowx":
            return float(bridge_to_simplerenv(g))
        # google robot: relative command, +1 = close, -1 = open (SimplerEnv's wrappers; sticky for 15 steps)
        rel = 0.0 if self.previous is None else self.previous - g
        self.previous = g
        if abs(rel) > 0.5 and not self.sticky_on:
            self.sticky_on, self.sticky_value = True, rel
        if self.sticky_on:
            self.repeat += 1
            rel = self.sticky_value
        if self.repeat == GOOGLE_STICKY_STEPS:
            self.sticky_on, self.repeat, self.sticky_value = False, 0, 0.0
        return float(rel)


def bridge_to_simpler(action: np.ndarray, gripper: GripperConverter) -> np.ndarray:
    """Bridge action -> SimplerEnv's [world_vector(3), rot_axangle(3), gripper(1)]."""
    a = validate_action(action)
    return np.concatenate([a[:3], euler_to_axis_angle(*a[3:6]), [gripper(float(a[6]))]]).astype(np.float64)


class SimplerBackend(SimBackend):
    """A SimplerEnv task (ManiSkill2-real2sim, prepackaged visual-matching config)."""

    name = "simpler"

    def __init__(self, config: SimConfig) -> None:
        super().__init__(config)
        if config.task not in SIMPLER_TASKS:
            raise SimError(f"SimplerEnv task {config.task!r} is not known here; choose one of {sorted(SIMPLER_TASKS)}")
        self.spec = SIMPLER_TASKS[config.task]
        simpler_env = import_simpler_env()
        from simpler_env.utils.env.observation_utils import get_image_from_maniskill2_obs_dict

        self._image_of = get_image_from_maniskill2_obs_dict
        try:
            self.env = simpler_env.make(config.task)
        except Exception as e:  # missing assets, Vulkan: SimplerEnv raises many types
            raise SimError(f"simpler_env.make({config.task!r}) failed: {e}\n{INSTALL_STEPS}") from e
        self.gripper = GripperConverter(self.spec.robot)
        self._obs: Any = None

    @property
    def max_steps(self) -> int:
        return self.config.max_steps or self.spec.max_steps

    def reset(self, seed: int) -> SimObservation:
        seed = int(seed)
        self._obs, _ = self.env.reset(seed=seed, options={"obj_init_options": {"episode_id": seed}})
        self.gripper.reset()
        ep = self.episode
        ep.seed, ep.steps, ep.done, ep.ever_success, ep.last_gripper = seed, 0, False, False, 1.0
        ep.instruction = str(self.env.get_language_instruction())
        return SimObservation(self._image(), ep.instruction, 0)

    def step(self, action: np.ndarray) -> StepResult:
        self._check_can_step()
        a = validate_action(action)
        sim_action = bridge_to_simpler(a, self.gripper)
        self._obs, reward, terminated, truncated, info = self.env.step(sim_action)
        ep = self.episode
        ep.steps += 1
        ep.last_gripper = float(a[6])
        success = bool(info.get("success", terminated))
        ep.ever_success |= success
        ep.done = bool(truncated) or ep.steps >= self.max_steps  # SimplerEnv runs to the limit; success = last step
        ep.instruction = str(self.env.get_language_instruction())
        out_info = {"simpler_action": sim_action, "executed_action": a, "terminated": bool(terminated),
                    "truncated": bool(truncated), **{k: v for k, v in info.items() if isinstance(v, (bool, int,
                                                                                                       float))}}
        return StepResult(SimObservation(self._image(), ep.instruction, ep.steps), float(reward), success, ep.done,
                          out_info)

    def _image(self) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(self._image_of(self.env, self._obs), dtype=np.uint8)[..., :3])

    def privileged_state(self) -> dict[str, Any]:
        u = self.env.unwrapped
        objects: dict[str, Any] = {}
        for actor in [o for o in (getattr(u, "episode_objs", None) or []) if o is not None]:
            pose = actor.pose
            objects[str(actor.name)] = {"position": [float(v) for v in pose.p],
                                        "orientation_wxyz": [float(v) for v in pose.q],
                                        "description": str(actor.name).replace("_", " ")}
        target_actor = getattr(u, "episode_target_obj", None)
        target = None
        if target_actor is not None:
            target = {"name": str(target_actor.name), "position": [float(v) for v in target_actor.pose.p],
                      "description": str(target_actor.name).replace("_", " ")}
        tcp = np.asarray(self._obs["extra"]["tcp_pose"], dtype=np.float64)
        source = getattr(u, "episode_source_obj", None)
        holding = None
        if source is not None and hasattr(u.agent, "check_grasp") and u.agent.check_grasp(source):
            holding = str(source.name)
        closedness = float(u.agent.get_gripper_closedness()) if hasattr(u.agent, "get_gripper_closedness") else 0.0
        return {"task": self.task, "phase": "approach", "objects": objects, "target": target,
                "gripper": {"position": tcp[:3].tolist(), "orientation_wxyz": tcp[3:7].tolist(),
                            "opening": float(np.clip(1.0 - closedness, 0.0, 1.0)), "holding": holding}}

    def camera_intrinsics(self) -> np.ndarray:
        cams = self.env.unwrapped._cameras  # noqa: SLF001 (SimplerEnv: no public camera list)
        name = "3rd_view_camera" if self.spec.robot == "widowx" else "overhead_camera"
        return np.asarray(cams[name].camera.get_intrinsic_matrix(), dtype=np.float64)

    def close(self) -> None:
        env = getattr(self, "env", None)
        if env is not None:
            env.close()
            self.env = None
