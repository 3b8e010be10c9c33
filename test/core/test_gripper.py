"""Gripper conventions (refinevla_core.gripper): Bridge 1 = open / 0 = closed against SimplerEnv's and datasets'."""

from __future__ import annotations

import numpy as np
import pytest

from refinevla_core.data import DataError
from refinevla_core.gripper import (
    GRIPPER_CLOSED,
    GRIPPER_OPEN,
    bridge_to_simplerenv,
    from_bridge,
    simplerenv_to_bridge,
    to_bridge,
)


def test_simplerenv_converters():
    # Bridge: 1 open / 0 closed; SimplerEnv WidowX: +1 open / -1 closed, binarised at 0.5
    np.testing.assert_array_equal(bridge_to_simplerenv([1.0, 0.0, 0.7, 0.3, 0.5]), [1, -1, 1, -1, -1])
    np.testing.assert_array_equal(simplerenv_to_bridge([1.0, -1.0, 0.0, 3.0]), [1.0, 0.0, 0.5, 1.0])
    for g in (GRIPPER_CLOSED, GRIPPER_OPEN):
        assert simplerenv_to_bridge(bridge_to_simplerenv(g)) == g
    with pytest.raises(DataError, match="NaN"):
        bridge_to_simplerenv(float("nan"))
    with pytest.raises(DataError, match="NaN"):
        simplerenv_to_bridge([0.0, float("inf")])


@pytest.mark.parametrize(("convention", "open_value", "closed_value"), [
    ("bridge", 1.0, 0.0), ("plus_minus_one", 1.0, -1.0), ("closed_is_one", 0.0, 1.0),
])
def test_dataset_conventions_name_open_and_closed(convention, open_value, closed_value):
    assert from_bridge(np.float64(GRIPPER_OPEN), convention) == open_value
    assert from_bridge(np.float64(GRIPPER_CLOSED), convention) == closed_value
    g = np.array([0.0, 0.25, 1.0])
    np.testing.assert_allclose(to_bridge(from_bridge(g, convention), convention), g)


def test_unknown_convention_names_the_known_ones():
    for convert in (to_bridge, from_bridge):
        with pytest.raises(DataError, match="plus_minus_one or closed_is_one"):
            convert(np.zeros(2), "minus_one_is_open")
