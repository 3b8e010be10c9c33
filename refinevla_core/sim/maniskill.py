"""ManiSkill3 tabletop tasks (Panda, end-effector delta control, CPU rendering) behind the SimBackend interface.

The one simulator that runs everywhere here (lavapipe renders it on a CPU), so every closed-loop test, the data
collector and the demo use it.

Action conventions — the whole point of this module is to convert them exactly:

    Bridge (ours, physical)                         ManiSkill pd_ee_delta_pose (normalised, [-1, 1])
    dx, dy, dz   metres, robot-base axes            a[0:3] = d / 0.1          (clipped to [-1, 1] per axis)
    droll, dpitch, dyaw  radians, extrinsic         a[3:6] = XYZ-intrinsic Euler angles / s_rot, where ManiSkill 3.0.1
      R = Rz(yaw) Ry(pitch) Rx(roll), base axes,      multiplies the normalised rotation by rot_lower = -0.1, so
      about the end-effector point                    s_rot = -0.1 (a sign flip, probed from the live controller);
                                                      the vector is scaled down to norm 1 when longer
    gripper 1 = open, 0 = closed (absolute)         a[6] = 2 g - 1            (-1 closed, +1 open)

Frames: ManiSkill's controller frame "root_translation:root_aligned_body_rotation" translates along the robot-base
axes and left-multiplies the rotation (base-frame axes, about the TCP point) — the same composition as Bridge's. The
Panda base sits at (-0.615, 0, 0) in the world with identity rotation, so base axes = world axes: x forward (away from
the robot), y left, z up (REP-103). With `pd_ee_delta_pose` the delta is applied to the measured TCP pose each step;
`pd_ee_target_delta_pose` composes onto the previous target pose as Bridge and SimplerEnv's ee_align2 do. Either way
one step is 1/20 s and moves at most 0.1 m and 0.1 rad (the arm may not reach the target within the step).

PickCube's goal sphere is hidden from the camera upstream (its goal is a state-only input there). With
SimConfig.show_goal (default) we render it, so the task can be solved from pixels; say so when comparing to upstream.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from refinevla_core.gripper import from_bridge, to_bridge
from refinevla_core.sim.check import VULKAN_HELP
from refinevla_core.sim.config import SimConfig
from refinevla_core.sim.experts import phase_of
from refinevla_core.sim.instructions import instruction_for
from refinevla_core.sim.interface import SimBackend, SimError, SimObservation, StepResult, validate_action

POS_SCALE_M = 0.1  # pd_ee_delta_pose: pos_lower/upper = -/+0.1
ROT_SCALE_RAD = -0.1  # ManiSkill 3.0.1 multiplies the normalised rotation by rot_lower (-0.1); probed at runtime
FINGER_MAX_M = 0.04  # Panda finger joint travel per finger; opening = (q1 + q2) / 0.08


@dataclass(frozen=True)
class ObjectSpec:
    name: str  # key in privileged_state()["objects"]
    attr: str  # attribute of the ManiSkill env holding the actor
    description: str  # what the camera shows, used in instructions and rationales
    size_m: float


@dataclass(frozen=True)
class TargetSpec:
    name: str
    attr: str
    description: str
    offset_m: tuple[float, float, float] = (0.0, 0.0, 0.0)  # added to the actor's position


@dataclass(frozen=True)
class TaskSpec:
    objects: tuple[ObjectSpec, ...]
    target: TargetSpec | None
    hidden_goal_attr: str = ""  # an actor upstream hides from the camera (shown when SimConfig.show_goal)


TASKS: dict[str, TaskSpec] = {
    "PushCube-v1": TaskSpec(
        objects=(ObjectSpec("cube", "obj", "blue cube", 0.04),),
        target=TargetSpec("goal", "goal_region", "red/white target disc"),
    ),
    "PickCube-v1": TaskSpec(
        objects=(ObjectSpec("cube", "cube", "red cube", 0.04),),
        target=TargetSpec("goal", "goal_site", "green goal sphere"),
        hidden_goal_attr="goal_site",
    ),
    "StackCube-v1": TaskSpec(
        objects=(ObjectSpec("red_cube", "cubeA", "red cube", 0.04), ObjectSpec("green_cube", "cubeB", "green cube",
                                                                               0.04)),
        target=TargetSpec("goal", "cubeB", "top of the green cube", offset_m=(0.0, 0.0, 0.04)),
    ),
}


# ---- rotation helpers (numpy; exact, no small-angle approximation) ---------------------------------------------------
def _rx(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _ry(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rz(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def rpy_to_matrix(roll: float, pitch: float, yaw: float) -> np.ndarray:
    """Bridge / REP-103 extrinsic roll-pitch-yaw: R = Rz(yaw) @ Ry(pitch) @ Rx(roll)."""
    return _rz(yaw) @ _ry(pitch) @ _rx(roll)


def matrix_to_rpy(m: np.ndarray) -> np.ndarray:
    """Inverse of rpy_to_matrix (pitch in [-pi/2, pi/2])."""
    pitch = math.asin(float(np.clip(-m[2, 0], -1.0, 1.0)))
    return np.array([math.atan2(m[2, 1], m[2, 2]), pitch, math.atan2(m[1, 0], m[0, 0])])


def xyz_intrinsic_to_matrix(a: float, b: float, c: float) -> np.ndarray:
    """ManiSkill's euler_angles_to_matrix(angles, "XYZ") (pytorch3d): R = Rx(a) @ Ry(b) @ Rz(c)."""
    return _rx(a) @ _ry(b) @ _rz(c)


def matrix_to_xyz_intrinsic(m: np.ndarray) -> np.ndarray:
    """Inverse of xyz_intrinsic_to_matrix (b in [-pi/2, pi/2])."""
    b = math.asin(float(np.clip(m[0, 2], -1.0, 1.0)))
    return np.array([math.atan2(-m[1, 2], m[2, 2]), b, math.atan2(-m[0, 1], m[0, 0])])


# ---- action conversion ---------------------------------------------------------------------------------------------
def bridge_to_maniskill(action: np.ndarray, pos_scale: float = POS_SCALE_M,
                        rot_scale: float = ROT_SCALE_RAD) -> np.ndarray:
    """Bridge physical action (m, rad, gripper 1 open/0 closed) -> ManiSkill normalised float32[7] in [-1, 1].

    Translation is clipped per axis and the rotation vector to norm 1, exactly as ManiSkill's controller would, so
    maniskill_to_bridge() of the result is the motion that is really commanded."""
    a = validate_action(action)
    out = np.empty(7, dtype=np.float64)
    out[:3] = np.clip(a[:3] / pos_scale, -1.0, 1.0)
    angles = matrix_to_xyz_intrinsic(rpy_to_matrix(*a[3:6])) if np.any(a[3:6]) else np.zeros(3)
    rot = angles / rot_scale
    norm = float(np.linalg.norm(rot))
    out[3:6] = rot / norm if norm > 1.0 else rot
    out[6] = np.clip(from_bridge(a[6], "plus_minus_one"), -1.0, 1.0)
    return out.astype(np.float32)


def maniskill_to_bridge(normalised: np.ndarray, pos_scale: float = POS_SCALE_M,
                        rot_scale: float = ROT_SCALE_RAD) -> np.ndarray:
    """ManiSkill normalised action -> Bridge physical float64[7] (inverse of bridge_to_maniskill within its range)."""
    n = np.asarray(normalised, dtype=np.float64).reshape(-1)
    if n.shape != (7,):
        raise SimError(f"a ManiSkill pd_ee_delta_pose action has 7 values; got shape {np.shape(normalised)}")
    out = np.empty(7, dtype=np.float64)
    out[:3] = np.clip(n[:3], -1.0, 1.0) * pos_scale
    rot = n[3:6]
    norm = float(np.linalg.norm(rot))
    rot = rot / norm if norm > 1.0 else rot
    angles = rot * rot_scale
    out[3:6] = matrix_to_rpy(xyz_intrinsic_to_matrix(*angles)) if np.any(angles) else 0.0
    out[6] = to_bridge(np.clip(n[6], -1.0, 1.0), "plus_minus_one")
    return out


# ---- the backend ---------------------------------------------------------------------------------------------------
class ManiSkillBackend(SimBackend):
    """A ManiSkill3 task on the CPU (physx_cpu + SAPIEN CPU renderer): one env, reused across episodes."""

    name = "maniskill"

    def __init__(self, config: SimConfig) -> None:
        super().__init__(config)
        if config.task not in TASKS:
            raise SimError(f"ManiSkill task {config.task!r} is not supported here; choose one of {sorted(TASKS)} "
                           "(or a SimplerEnv task with backend=simpler)")
        self.spec = TASKS[config.task]
        warnings.filterwarnings("ignore", module="mani_skill")
        warnings.filterwarnings("ignore", message=".*sapien_cuda.*")
        # sapien's own Vulkan loader is what runs the ICD of $VK_ICD_FILENAMES (lavapipe): nothing to act on
        warnings.filterwarnings("ignore", message="Failed to find system libvulkan")
        try:
            import gymnasium as gym
            import mani_skill.envs  # noqa: F401  (registers the tasks)
            import torch
        except ImportError as e:
            raise SimError(f"ManiSkill3 is not installed ({e}); run ./setup.sh (WITH_SIM=1, the default) or "
                           "pip install 'refinevla[sim]'") from e
        self._torch = torch
        kwargs: dict[str, Any] = dict(
            obs_mode="rgb" if config.render else "state", control_mode=config.control_mode,
            sim_backend="physx_cpu", render_backend="cpu",
            sensor_configs=dict(width=config.image_size, height=config.image_size),
        )
        if config.max_steps:
            kwargs["max_episode_steps"] = config.max_steps
        t0 = time.perf_counter()
        try:
            self.env = gym.make(config.task, **kwargs)
        except RuntimeError as e:
            raise SimError(f"{VULKAN_HELP}\n(original error: {e})") from e
        self.make_seconds = time.perf_counter() - t0
        self.unwrapped = self.env.unwrapped
        self._max_steps = int(self.env.spec.max_episode_steps or config.max_steps or 50)
        self.pos_scale, self.rot_scale = self._probe_scales()

    @property
    def max_steps(self) -> int:
        return self._max_steps

    def _probe_scales(self) -> tuple[float, float]:
        """Ask the live arm controller how it scales a normalised action (guards against version differences, e.g.
        the sign of the rotation scale)."""
        arm = self.unwrapped.agent.controller.controllers["arm"]
        probe = self._torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.0, 0.0]], dtype=self._torch.float32)
        scaled = arm._clip_and_scale_action(probe)[0].cpu().numpy()  # noqa: SLF001 (ManiSkill internal)
        pos, rot = float(scaled[0]) / 0.5, float(scaled[3]) / 0.5
        if not (abs(abs(pos) - POS_SCALE_M) < 1e-6 and abs(abs(rot) - abs(ROT_SCALE_RAD)) < 1e-6):
            raise SimError(f"unexpected ManiSkill controller scaling (pos {pos}, rot {rot}); this refinevla expects "
                           f"+/-{POS_SCALE_M} m and +/-{abs(ROT_SCALE_RAD)} rad per step (mani-skill==3.0.1)")
        return pos, rot

    # ---- episode ---------------------------------------------------------------------------------------------------
    def reset(self, seed: int) -> SimObservation:
        seed = int(seed)
        try:
            # reconfigure: rebuild the scene, so no PhysX contact cache or solver warm start survives from the previous
            # episode; without it an episode's physics depends on the episodes run before it in this process
            obs, _ = self.env.reset(seed=seed, options={"reconfigure": self.config.reconfigure_each_episode})
        except RuntimeError as e:
            raise SimError(f"{VULKAN_HELP}\n(original error: {e})") from e
        self._show_goal()
        if self.spec.hidden_goal_attr and self.config.show_goal and self.config.render:
            obs = self.unwrapped.get_obs()  # re-render with the goal visible
        ep = self.episode
        ep.seed, ep.steps, ep.done, ep.ever_success, ep.last_gripper = seed, 0, False, False, 1.0
        ep.instruction = instruction_for(self.task, seed, self.config.instruction_mode)
        ep.extra = {"success": False}
        return SimObservation(self._image(obs), ep.instruction, 0)

    def step(self, action: np.ndarray) -> StepResult:
        self._check_can_step()
        normalised = bridge_to_maniskill(action, self.pos_scale, self.rot_scale)
        executed = maniskill_to_bridge(normalised, self.pos_scale, self.rot_scale)
        obs, reward, terminated, truncated, info = self.env.step(normalised)
        ep = self.episode
        ep.steps += 1
        ep.last_gripper = float(executed[6])
        success = bool(_scalar(info.get("success", False)))
        ep.ever_success |= success
        ep.done = bool(_scalar(terminated)) or bool(_scalar(truncated)) or ep.steps >= self.max_steps
        ep.extra = {"success": success}
        out_info = {"executed_action": executed, "normalised_action": normalised,
                    "terminated": bool(_scalar(terminated)), "truncated": bool(_scalar(truncated)),
                    **{k: bool(_scalar(v)) for k, v in info.items() if k.startswith("is_")}}
        return StepResult(SimObservation(self._image(obs), ep.instruction, ep.steps), float(_scalar(reward)),
                          success, ep.done, out_info)

    def _show_goal(self) -> None:
        attr = self.spec.hidden_goal_attr
        if attr and self.config.show_goal:
            goal = getattr(self.unwrapped, attr)
            hidden = self.unwrapped._hidden_objects  # noqa: SLF001 (ManiSkill: no public API)
            if goal in hidden:
                hidden.remove(goal)
                goal.show_visual()

    def _image(self, obs: Any) -> np.ndarray | None:
        if not self.config.render:
            return None
        rgb = obs["sensor_data"]["base_camera"]["rgb"]
        return np.ascontiguousarray(rgb[0].cpu().numpy().astype(np.uint8, copy=False))

    # ---- ground truth ----------------------------------------------------------------------------------------------
    def privileged_state(self) -> dict[str, Any]:
        u = self.unwrapped
        objects = {}
        for spec in self.spec.objects:
            pose = getattr(u, spec.attr).pose.raw_pose[0].cpu().numpy().astype(np.float64)
            objects[spec.name] = {"position": _r(pose[:3]), "orientation_wxyz": _r(pose[3:7]),
                                  "description": spec.description, "size_m": spec.size_m}
        target = None
        if self.spec.target is not None:
            t = self.spec.target
            p = getattr(u, t.attr).pose.p[0].cpu().numpy().astype(np.float64) + np.asarray(t.offset_m)
            target = {"name": t.name, "position": _r(p), "description": t.description}
        tcp = u.agent.tcp.pose.raw_pose[0].cpu().numpy().astype(np.float64)
        fingers = u.agent.robot.get_qpos()[0, -2:].cpu().numpy().astype(np.float64)
        holding = None
        # contact forces are those of the last physics step: right after reset() they still belong to the previous
        # episode (a cube grasped there would read as held here), and nothing can be held in a fresh scene
        for spec in self.spec.objects if self.episode.steps > 0 else ():
            if bool(u.agent.is_grasping(getattr(u, spec.attr))[0]):
                holding = spec.name
                break
        state: dict[str, Any] = {
            "task": self.task, "phase": "approach", "objects": objects, "target": target,
            "gripper": {"position": _r(tcp[:3]), "orientation_wxyz": _r(tcp[3:7]),
                        "opening": round(float(np.clip(fingers.sum() / (2 * FINGER_MAX_M), 0.0, 1.0)), 4),
                        "holding": holding},
        }
        state["phase"] = phase_of(state)
        return state

    def camera_intrinsics(self) -> np.ndarray:
        cam = self.unwrapped.scene.sensors["base_camera"]
        return np.asarray(cam.camera.get_intrinsic_matrix()[0].cpu().numpy(), dtype=np.float64)

    def close(self) -> None:
        env = getattr(self, "env", None)
        if env is not None:
            env.close()
            self.env = None


def _scalar(v: Any) -> Any:
    """ManiSkill returns (1,)-tensors for a single env."""
    if hasattr(v, "reshape"):
        v = v.reshape(-1)[0]
    return v.item() if hasattr(v, "item") else v


def _r(a: np.ndarray) -> list[float]:
    """JSON-friendly rounding to 0.1 mm / 1e-5: keeps states small and exactly reproducible as text."""
    return [round(float(x), 5) for x in a]
