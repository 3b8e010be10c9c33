"""Configs of the simulator side: which task and camera (SimConfig) and how the ROS bridge steps it (SimBridgeConfig).

Plain dataclasses so `config/sim_bridge.yaml`, `--ros-args -p key:=value` (the ROS package's params module mirrors
nested fields as dotted parameters, e.g. `sim.task`) and the Python API share one vocabulary and one validation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

CONTROL_MODES = ("pd_ee_delta_pose", "pd_ee_target_delta_pose")


@dataclass
class SimConfig:
    """One simulated task: backend, task id, camera, episode length."""

    backend: Literal["auto", "maniskill", "simpler"] = "auto"  # auto: SimplerEnv names -> simpler, else maniskill
    task: str = "PushCube-v1"
    image_size: int = 112  # square camera images, pixels (the ManiSkill camera is re-sized, not cropped)
    max_steps: int = 0  # 0 = the task's own limit (50 for the ManiSkill tabletop tasks)
    # ManiSkill arm controller. pd_ee_delta_pose: each delta is applied to the MEASURED end-effector pose;
    # pd_ee_target_delta_pose: to the previous TARGET pose, as Bridge data and SimplerEnv's ee_align2 do.
    control_mode: Literal["pd_ee_delta_pose", "pd_ee_target_delta_pose"] = "pd_ee_delta_pose"
    render: bool = True  # False: no camera images (experts and benchmarks of the physics only; 10x faster)
    instruction_mode: Literal["varied", "canonical"] = "varied"  # varied: a templated phrasing drawn from the seed
    # rebuild the scene at every reset (~0.1-0.3 s): episodes then depend only on (seed, actions), not on the episodes
    # before them in the same process (PhysX keeps contact caches across a plain reset)
    reconfigure_each_episode: bool = True
    show_goal: bool = True  # PickCube hides its goal marker from the camera upstream; True renders it (maniskill.py)

    def __post_init__(self) -> None:
        if not 16 <= self.image_size <= 1024:
            raise ValueError(f"image_size {self.image_size} is outside 16..1024 pixels")
        if self.max_steps < 0:
            raise ValueError(f"max_steps {self.max_steps} must be >= 0 (0 = the task's default)")
        if not self.task.strip():
            raise ValueError("task is empty; name one, e.g. PushCube-v1 (see refinevla_core.sim.backend.TASKS)")


@dataclass
class SimBridgeConfig:
    """How the ROS package's sim_bridge_node turns action messages into simulator steps."""

    sim: SimConfig = field(default_factory=SimConfig)
    # `next_task` cycles through these, comma-separated (empty: only sim.task); a string because a ROS parameter
    # cannot hold an empty string list
    tasks: str = ""
    # lockstep: one step per action computed from the CURRENT image (matched by header stamp), or a hold step when
    #           none arrives within action_timeout_s; deterministic, used by evaluation.
    # control_rate: a timer steps at control_hz with the newest action, or a hold step when none is newer than
    #               action_timeout_s; a real-time robot's behaviour.
    step_mode: Literal["lockstep", "control_rate"] = "lockstep"
    control_hz: float = 5.0  # control_rate mode only (Bridge data were recorded at 5 Hz)
    action_timeout_s: float = 2.0  # missing/late action -> hold position; 0 = wait for ever (lockstep only)
    gripper_grace_s: float = 0.2  # lockstep: after an EE delta, wait this long for the gripper of the same decision
    action_source: Literal["ee_delta", "action"] = "ee_delta"  # ee_delta + gripper topics, or the bundled Action
    # at a reset the instruction is published this long before the episode's first image, so a policy node has the
    # new instruction (a new episode) before it sees the new scene
    instruction_lead_s: float = 0.2
    republish_s: float = 0.5  # lockstep: re-send the waiting image this often (best-effort camera); 0 = never
    first_seed: int = 0  # seed of the first episode; a reset with seed < 0 takes the next one in sequence
    auto_reset: bool = False  # start the next episode (next seed) by itself when one is done
    publish_privileged_state: bool = False  # debug topic with the simulator's ground truth (scripted experts only)
    camera_frame_id: str = "base_camera"
    world_frame_id: str = "world"  # the frame the EE deltas are expressed in (ManiSkill: robot base axes = world)

    def __post_init__(self) -> None:
        if self.control_hz <= 0:
            raise ValueError(f"control_hz {self.control_hz} must be > 0")
        if self.action_timeout_s < 0:
            raise ValueError(f"action_timeout_s {self.action_timeout_s} must be >= 0 (0 = wait for ever)")
        if self.instruction_lead_s < 0 or self.republish_s < 0:
            raise ValueError("instruction_lead_s and republish_s must be >= 0")
        if self.step_mode == "control_rate" and self.action_timeout_s == 0:
            raise ValueError("control_rate mode needs action_timeout_s > 0 (how old an action may be)")

    @property
    def task_cycle(self) -> list[str]:
        names = [t.strip() for t in self.tasks.split(",") if t.strip()]
        return names or [self.sim.task]
