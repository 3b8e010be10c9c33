"""Opt-in SpatialVLA / OpenVLA adapters. Their checkpoints cannot be downloaded here, so this tests what is testable:
nothing loads without an explicit trust_remote_code=True, the offline failure names the fix, and the conversion of
their outputs to PolicyOutput — with stand-in objects exposing the same predict_action / decode_actions API as the
models' remote code (stand-ins, not the models)."""

from __future__ import annotations

import numpy as np
import pytest

from refinevla_core.inference.types import PolicyOutput
from refinevla_core.model.adapters import AdapterError, OpenVLAPolicy, SpatialVLAPolicy
from test.core.model_util import example_image


@pytest.mark.parametrize("cls", [SpatialVLAPolicy, OpenVLAPolicy])
def test_remote_code_is_never_trusted_implicitly(cls):
    with pytest.raises(AdapterError, match="trust_remote_code=True"):
        cls.from_pretrained()


@pytest.mark.parametrize("cls", [SpatialVLAPolicy, OpenVLAPolicy])
def test_unavailable_checkpoint_names_the_fix(cls, tmp_path):
    with pytest.raises(AdapterError, match="HF cache"):
        cls.from_pretrained(str(tmp_path / "not-downloaded"), trust_remote_code=True, device="cpu")


class SpatialVLAStandIn:
    """Same call shapes as SpatialVLA's remote code: processor(images=, text=) -> inputs; model.predict_action(inputs);
    processor.decode_actions(out, unnorm_key) -> {"actions": (chunk, 7)}."""

    def __init__(self, chunk):
        self.chunk, self.calls = np.asarray(chunk), []

    def __call__(self, images, text, return_tensors):
        self.calls.append((images[0].size, text))
        return {"pixel_values": None}

    def predict_action(self, inputs):
        return "generated ids"

    def decode_actions(self, generated, unnorm_key):
        assert generated == "generated ids"
        self.calls.append(unnorm_key)
        return {"actions": self.chunk}


class OpenVLAStandIn:
    def __init__(self, action):
        self.action, self.prompts = action, []

    def __call__(self, prompt, image):
        self.prompts.append(prompt)
        return {"input_ids": None}

    def predict_action(self, input_ids, unnorm_key, do_sample):
        assert unnorm_key == "bridge_orig" and do_sample is False
        return self.action


def test_spatialvla_output_becomes_a_policy_output():
    chunk = [[0.01, 0.0, -0.02, 0.1, 0.0, 0.0, 1.3], [0.0] * 7, [0.0] * 7, [0.0] * 7]
    stand_in = SpatialVLAStandIn(chunk)
    policy = SpatialVLAPolicy(stand_in, stand_in)
    out = policy.predict(example_image(), "put the spoon on the towel")
    assert isinstance(out, PolicyOutput) and out.action.dtype == np.float32
    np.testing.assert_allclose(out.action[:6], chunk[0][:6], rtol=1e-6)
    assert out.gripper == 1.0  # clipped into Bridge's [0, 1]
    assert policy.last_chunk.shape == (4, 7) and stand_in.calls == [((80, 64), "put the spoon on the towel"),
                                                                    "bridge_orig/1.0.0"]
    assert len(policy.predict_batch([example_image()] * 2, ["a", "b"])) == 2


def test_openvla_prompt_and_unsafe_outputs():
    stand_in = OpenVLAStandIn(np.array([0.0, 0.01, 0.0, 0.0, 0.0, 0.0, 0.0]))
    policy = OpenVLAPolicy(stand_in, stand_in)
    out = policy.predict(example_image(), "Put the Carrot on the plate")
    assert stand_in.prompts == ["In: What action should the robot take to put the carrot on the plate?\nOut:"]
    assert out.gripper == 0.0 and out.rationale is None
    stand_in.action = np.array([0.0, np.nan, 0, 0, 0, 0, 1])
    with pytest.raises(AdapterError, match="non-finite"):
        policy.predict(example_image(), "x")
    stand_in.action = np.zeros(6)
    with pytest.raises(AdapterError, match="expected 7"):
        policy.predict(example_image(), "x")
