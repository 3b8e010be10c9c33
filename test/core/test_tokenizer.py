"""ActionTokenizer: OpenVLA-style 256 bins per dimension between q01 and q99, clipping."""

from __future__ import annotations

import numpy as np
import pytest

from refinevla_core.data import DataError
from refinevla_core.data.stats import compute_stats
from refinevla_core.model.tokenizer import ActionTokenizer


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    actions = np.concatenate([rng.normal(0, 0.02, (2000, 3)), rng.normal(0, 0.1, (2000, 3)),
                              rng.integers(0, 2, (2000, 1))], axis=1).astype(np.float32)
    return actions


def test_round_trip_error_is_at_most_half_a_bin_inside_the_range(data):
    stats = compute_stats(data)
    tok = ActionTokenizer.from_stats(stats)
    bins = tok.encode(data)
    assert bins.shape == data.shape and bins.dtype == np.int64
    assert bins.min() >= 0 and bins.max() <= 255
    back = tok.decode(bins)
    inside = (data >= tok.low) & (data <= tok.high)
    err = np.abs(back - data)
    assert (err[inside] <= np.broadcast_to(tok.bin_width / 2 + 1e-6, data.shape)[inside]).all()
    # the gripper range is the fixed Bridge [0, 1]: open and closed survive exactly to within half a bin
    assert np.allclose(tok.decode(tok.encode(np.array([0, 0, 0, 0, 0, 0, 1.0])))[6], 1.0, atol=1 / 512)
    assert tok.low[6] == 0.0 and tok.high[6] == 1.0


def test_values_beyond_q01_q99_are_clipped_to_the_edge_bins(data):
    tok = ActionTokenizer.from_stats(compute_stats(data))
    big = np.array([[10.0, -10.0, 0, 0, 0, 0, 2.0]])
    bins = tok.encode(big)
    assert bins[0, 0] == 255 and bins[0, 1] == 0 and bins[0, 6] == 255
    assert tok.decode(bins)[0, 0] == pytest.approx(tok.high[0] - tok.bin_width[0] / 2, rel=1e-5)


def test_a_constant_dimension_decodes_to_its_value():
    actions = np.zeros((100, 7), np.float32)
    actions[:, 0] = np.linspace(-0.01, 0.01, 100)
    actions[:, 3] = 0.25  # never varies
    tok = ActionTokenizer.from_stats(compute_stats(actions))
    back = tok.decode(tok.encode(actions))
    np.testing.assert_allclose(back[:, 3], 0.25, atol=1e-6)


def test_bad_inputs_are_clear_errors(data):
    tok = ActionTokenizer.from_stats(compute_stats(data))
    with pytest.raises(DataError, match="non-finite dpitch"):
        tok.encode(np.array([0, 0, 0, 0, np.nan, 0, 1.0]))
    with pytest.raises(DataError, match="last dimension of 7"):
        tok.encode(np.zeros(6))
    with pytest.raises(DataError, match=r"0\.\.255"):
        tok.decode(np.array([0, 0, 0, 0, 0, 0, 256]))


def test_serialisation_round_trip(data):
    tok = ActionTokenizer.from_stats(compute_stats(data), n_bins=128)
    again = ActionTokenizer.from_dict(tok.to_dict())
    assert again.n_bins == 128
    np.testing.assert_array_equal(again.encode(data), tok.encode(data))
    with pytest.raises(DataError, match="incomplete"):
        ActionTokenizer.from_dict({"low": [0] * 7})
