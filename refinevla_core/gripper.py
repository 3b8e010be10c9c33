"""Gripper conventions and their converters, in one place: every robot, simulator and dataset format says "open"
differently, and a wrong sign closes the gripper on nothing.

    bridge (this project, BridgeData V2, PolicyOutput)   absolute, 1 = open, 0 = closed, continuous in [0, 1]
    plus_minus_one (SimplerEnv WidowX, Octo, ManiSkill)   absolute, +1 = open, -1 = closed
    closed_is_one (some LeRobot datasets)                 absolute, 1 = closed, 0 = open

SimplerEnv's WidowX policies binarise at 0.5 before stepping, 2 * (g > 0.5) - 1 (the OpenVLA/Octo wrappers):
`bridge_to_simplerenv`. Relative conventions (SimplerEnv's Google robot) keep state and live with their simulator
(refinevla_core.sim.simpler.GripperConverter). Test a converter whenever a new robot or simulator is wired in.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from refinevla_core.data.episode import DataError

GRIPPER_OPEN = 1.0  # Bridge
GRIPPER_CLOSED = 0.0  # Bridge
GripperConvention = Literal["bridge", "plus_minus_one", "closed_is_one"]
CONVENTIONS_HINT = "use bridge, plus_minus_one or closed_is_one"


def to_bridge(values: Any, convention: GripperConvention) -> Any:
    """Gripper values in `convention` -> Bridge (1 = open, 0 = closed); exact, not clipped (callers check the range,
    since values outside it mean the convention is wrong)."""
    if convention == "bridge":
        return values
    if convention == "plus_minus_one":
        return (values + 1.0) / 2.0
    if convention == "closed_is_one":
        return 1.0 - values
    raise DataError(f"unknown gripper convention {convention!r}; {CONVENTIONS_HINT}")


def from_bridge(values: Any, convention: GripperConvention) -> Any:
    """Bridge gripper values -> `convention` (the inverse of to_bridge)."""
    if convention == "bridge":
        return values
    if convention == "plus_minus_one":
        return values * 2.0 - 1.0
    if convention == "closed_is_one":
        return 1.0 - values
    raise DataError(f"unknown gripper convention {convention!r}; {CONVENTIONS_HINT}")


def _finite(gripper: Any) -> np.ndarray:
    g = np.asarray(gripper, dtype=np.float64)
    if not np.isfinite(g).all():
        raise DataError("gripper value is NaN/inf; refusing to convert an undefined gripper command")
    return g


def bridge_to_simplerenv(gripper: Any) -> np.ndarray:
    """Bridge absolute gripper (1 open, 0 closed) -> SimplerEnv WidowX command (+1 open, -1 closed), binarised at 0.5
    as the OpenVLA/Octo SimplerEnv wrappers do."""
    return np.where(_finite(gripper) > 0.5, 1.0, -1.0).astype(np.float32)


def simplerenv_to_bridge(gripper: Any) -> np.ndarray:
    """SimplerEnv WidowX command (+1 open, -1 closed, anything in between) -> Bridge absolute gripper in [0, 1]."""
    return np.clip(to_bridge(_finite(gripper), "plus_minus_one"), 0.0, 1.0).astype(np.float32)
