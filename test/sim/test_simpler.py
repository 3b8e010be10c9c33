"""SimplerEnv cannot run here: the real code path exists and, without `simpler_env`, every entry point says how to
install it. The conventions it converts to are checked against scipy."""

from __future__ import annotations

import numpy as np
import pytest

from refinevla_core.sim.backend import SimError, make_backend
from refinevla_core.sim.config import SimConfig
from refinevla_core.sim.simpler import (
    SIMPLER_TASKS,
    GripperConverter,
    bridge_to_simpler,
    euler_to_axis_angle,
    is_simpler_task,
    simpler_available,
)


@pytest.mark.skipif(simpler_available(), reason="simpler_env is installed here")
@pytest.mark.parametrize("task", ["widowx_carrot_on_plate", "google_robot_pick_coke_can"])
def test_missing_simpler_env_lists_the_install_steps(task):
    with pytest.raises(SimError) as err:
        make_backend(SimConfig(task=task))  # backend "auto" picks SimplerEnv for these names
    message = str(err.value)
    assert "SimplerEnv is not installed" in message
    assert "git clone https://github.com/simpler-env/SimplerEnv --recurse-submodules" in message
    assert "pip install -e SimplerEnv/ManiSkill2_real2sim" in message
    assert "MS2_REAL2SIM_ASSET_DIR" in message


def test_task_names_route_to_the_right_backend():
    assert is_simpler_task("widowx_stack_cube") and is_simpler_task("google_robot_move_near")
    assert not is_simpler_task("PushCube-v1")
    assert SIMPLER_TASKS["widowx_put_eggplant_in_basket"].max_steps == 120
    with pytest.raises(SimError, match="not known here"):
        from refinevla_core.sim.simpler import SimplerBackend

        SimplerBackend(SimConfig(task="widowx_fold_laundry"))


def test_euler_to_axis_angle_matches_scipy():
    rotation = pytest.importorskip("scipy.spatial.transform").Rotation  # comes with the sim extras (mani-skill)
    rng = np.random.default_rng(0)
    for rpy in [*rng.uniform(-0.4, 0.4, (20, 3)), [0.0, 0.0, 0.0], [np.pi, 0.0, 0.0], [0.0, 0.0, -np.pi / 2]]:
        expected = rotation.from_euler("xyz", rpy).as_rotvec()  # extrinsic xyz: R = Rz Ry Rx (Bridge)
        got = euler_to_axis_angle(*rpy)
        assert np.allclose(rotation.from_rotvec(got).as_matrix(), rotation.from_rotvec(expected).as_matrix(),
                           atol=1e-9), rpy


def test_gripper_conventions():
    widowx = GripperConverter("widowx")
    assert [widowx(g) for g in (1.0, 0.8, 0.5, 0.2, 0.0)] == [1.0, 1.0, -1.0, -1.0, -1.0]
    google = GripperConverter("google_robot")
    out = [google(g) for g in [1.0, 1.0, 0.0] + [0.0] * 16]
    assert out[:2] == [0.0, 0.0]  # no change: no command
    assert out[2:17] == [1.0] * 15  # open -> closed: +1 (close), sticky for 15 steps
    assert out[17] == 0.0
    action = bridge_to_simpler(np.array([0.01, -0.02, 0.0, 0.0, 0.0, 0.1, 1.0]), GripperConverter("widowx"))
    assert np.allclose(action, [0.01, -0.02, 0.0, 0.0, 0.0, 0.1, 1.0])
    with pytest.raises(SimError, match="non-finite"):
        bridge_to_simpler(np.array([np.nan, 0, 0, 0, 0, 0, 1.0]), widowx)
