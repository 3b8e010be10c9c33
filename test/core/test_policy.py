"""Policy: checkpoint in, un-normalised actions + rationales out, in the three rationale modes, deterministic, with the
rationale cache of every_n mode; checked on a random model (format, grammar) and on a tiny model that really learned
one (image, instruction) -> (rationale, action) pair with the joint loss."""

from __future__ import annotations

import numpy as np
import pytest

from refinevla_core.config import ConfigError
from refinevla_core.inference.policy import Policy, PolicyConfig
from refinevla_core.inference.types import PolicyOutput
from refinevla_core.model.checkpoint import save_checkpoint
from refinevla_core.model.processor_refinevla import ProcessorError
from test.core.model_util import INSTRUCTION, RATIONALE, TARGET_ACTION, example_image, overfit_tiny, tiny_vla


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    vla = tiny_vla()
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "tiny", vla, vla.processor, vla.stats, vla.refinevla_config)


def check_format(out: PolicyOutput, policy: Policy) -> None:
    assert isinstance(out, PolicyOutput)
    assert out.action.shape == (7,) and out.action.dtype == np.float32 and np.isfinite(out.action).all()
    tok = policy.model.processor.action_tokenizer
    assert (out.action >= tok.low - 1e-6).all() and (out.action <= tok.high + 1e-6).all()
    assert 0.0 <= out.gripper <= 1.0 and out.delta.shape == (6,)
    assert {"preprocess", "generate", "action", "total"} <= set(out.timings_ms)
    assert out.timings_ms["action"] <= out.timings_ms["total"]


@pytest.mark.parametrize("mode", ["action_only", "every_step", "every_n"])
def test_every_mode_returns_the_same_action_format(checkpoint, mode):
    policy = Policy.from_checkpoint(checkpoint, config=PolicyConfig(rationale_mode=mode, max_rationale_tokens=8))
    out = policy.predict(example_image(), INSTRUCTION)
    check_format(out, policy)
    if mode == "action_only":
        assert out.rationale is None and out.rationale_text == "" and not out.rationale_fresh
    else:
        # an untrained model writes text that is not four sections: rationale None, the text kept
        assert out.rationale_fresh and out.rationale is None and isinstance(out.rationale_text, str)


def test_predictions_are_deterministic_given_the_seed(checkpoint):
    config = PolicyConfig(rationale_mode="every_step", do_sample=True, temperature=1.0, seed=7,
                          max_rationale_tokens=6)
    images = [example_image(s) for s in range(3)]

    def run(policy):
        return [policy.predict(im, INSTRUCTION) for im in images]

    first, second = Policy.from_checkpoint(checkpoint, config=config), Policy.from_checkpoint(checkpoint, config=config)
    a, b = run(first), run(second)
    first.reset()
    c = run(first)
    for x, y, z in zip(a, b, c, strict=True):
        np.testing.assert_array_equal(x.action, y.action)
        np.testing.assert_array_equal(x.action, z.action)
        assert x.rationale_text == y.rationale_text == z.rationale_text


def test_batch_rows_are_independent_streams(checkpoint):
    policy = Policy.from_checkpoint(checkpoint, config=PolicyConfig(rationale_mode="every_step",
                                                                      max_rationale_tokens=6))
    images = [example_image(1), example_image(2, (100, 60))]
    instructions = [INSTRUCTION, "put the carrot on the plate"]
    batch = policy.predict_batch(images, instructions)
    alone = [policy.predict(im, ins) for im, ins in zip(images, instructions, strict=True)]
    for x, y in zip(batch, alone, strict=True):
        np.testing.assert_array_equal(x.action, y.action)
        assert x.rationale_text == y.rationale_text
    assert policy.predict_batch([], []) == []


def test_every_n_feeds_the_cached_rationale_as_a_prefix(checkpoint):
    """rationale_then_action, in-between steps: the action is decoded after the cached rationale's tokens."""
    policy = Policy.from_checkpoint(checkpoint, config=PolicyConfig(rationale_mode="every_n", rationale_every_n=3,
                                                                      max_rationale_tokens=6))
    image = example_image(4)
    fresh = [policy.predict(image, INSTRUCTION) for _ in range(4)]
    assert [o.rationale_fresh for o in fresh] == [True, False, False, True]
    assert fresh[1].rationale_text == fresh[0].rationale_text
    cached_ids = policy._cache[0].ids
    (expected,) = policy.model.generate([image], [INSTRUCTION], plan="action", fed_rationales=[cached_ids])
    np.testing.assert_array_equal(fresh[2].action, policy.model.processor.decode_actions(expected.action_bins))
    # a new instruction or a new episode makes the rationale due again
    assert policy.predict(image, "put the carrot on the plate").rationale_fresh
    policy.reset()
    assert policy.step == 0 and policy.predict(image, "put the carrot on the plate").rationale_fresh


@pytest.mark.parametrize("order", ["rationale_then_action", "action_then_rationale"])
def test_a_trained_model_gives_its_rationale_and_action(order):
    vla = overfit_tiny(order)
    image = example_image()
    half_bin = vla.processor.action_tokenizer.bin_width / 2 + 1e-6
    every = Policy(vla, PolicyConfig(rationale_mode="every_step"))
    out = every.predict(image, INSTRUCTION)
    assert out.rationale == RATIONALE and out.rationale_fresh
    assert (np.abs(out.action - TARGET_ACTION) <= half_bin).all()
    only = Policy(vla, PolicyConfig(rationale_mode="action_only")).predict(image, INSTRUCTION)
    np.testing.assert_array_equal(only.action, out.action)
    assert only.rationale is None
    cached = Policy(vla, PolicyConfig(rationale_mode="every_n", rationale_every_n=5))
    steps = [cached.predict(image, INSTRUCTION) for _ in range(2)]
    assert [s.rationale_fresh for s in steps] == [True, False] and steps[1].rationale == RATIONALE
    np.testing.assert_array_equal(steps[1].action, out.action)
    if order == "action_then_rationale":
        # the action is ready before the rationale is written: action-only costs nothing extra
        assert out.timings_ms["action"] < out.timings_ms["generate"]


def test_bad_inputs_are_clear_errors(checkpoint):
    policy = Policy.from_checkpoint(checkpoint, config=PolicyConfig(rationale_mode="action_only"))
    with pytest.raises(ProcessorError, match="uint8"):
        policy.predict(example_image().astype(np.float64), INSTRUCTION)
    with pytest.raises(ProcessorError, match="instruction is empty"):
        policy.predict(example_image(), "")
    with pytest.raises(ValueError, match="2 images but 1 instructions"):
        policy.predict_batch([example_image(), example_image()], [INSTRUCTION])
    with pytest.raises(ConfigError, match="rationale_mode 'sometimes'"):
        PolicyConfig(rationale_mode="sometimes")
    with pytest.raises(ConfigError, match="rationale_every_n"):
        PolicyConfig(rationale_every_n=0)
    with pytest.raises(ConfigError, match="dtype 'fp8'"):
        PolicyConfig(dtype="fp8")
    assert policy.step == 0  # failed calls do not advance the episode
