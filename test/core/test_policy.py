"""Policy: checkpoint in, un-normalised actions + rationales out, in the three rationale modes, deterministic, with the
rationale cache of every_n mode, and the streaming / async modes that write rationales beside control; checked on a
random model (format, grammar) and on a tiny model that really learned one (image, instruction) -> (rationale,
action) pair with the joint loss."""

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
    cached_ids = policy.cached_rationale(0).ids
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


def test_streaming_returns_the_action_first_and_the_rationale_later():
    vla = overfit_tiny("action_then_rationale")
    image, half_bin = example_image(), vla.processor.action_tokenizer.bin_width / 2 + 1e-6
    policy = Policy(vla, PolicyConfig(rationale_mode="streaming", rationale_every_n=1))
    try:
        first = policy.predict(image, INSTRUCTION)
        assert (np.abs(first.action - TARGET_ACTION) <= half_bin).all()
        assert first.rationale is None and first.rationale_pending is not None, "the rationale follows the action"
        late = first.rationale_pending.result(timeout=60)
        assert late.rationale == RATIONALE and late.complete
        assert first.timings_ms["action"] < late.generate_ms, "the action was handed over mid-generation"
        assert policy.wait_background(60)
        second = policy.predict(image, INSTRUCTION)  # the last one finished: a new one starts (every_n = 1)
        assert second.rationale_pending is not None and (np.abs(second.action - first.action) <= 2 * half_bin).all()
        assert second.rationale_pending.result(timeout=60).rationale == RATIONALE
    finally:
        policy.close()
    with pytest.raises(ConfigError, match=r"writes its rationale first .* use async"):
        Policy(overfit_tiny("rationale_then_action"), PolicyConfig(rationale_mode="streaming"))


def test_streaming_steps_in_between_are_action_only_while_a_rationale_is_written():
    policy = Policy(overfit_tiny("action_then_rationale"), PolicyConfig(rationale_mode="streaming",
                                                                        rationale_every_n=3))
    image = example_image()
    try:
        outs = []
        for _ in range(4):
            outs.append(policy.predict(image, INSTRUCTION))
            assert policy.wait_background(60)
        assert [o.rationale_pending is not None for o in outs] == [True, False, False, True]
        assert [o.rationale_age_steps for o in outs] == [0, 1, 2, 0]
        assert outs[1].rationale is None and outs[2].rationale is None, "in between: action-only steps"
    finally:
        policy.close()


def test_async_feeds_the_cached_rationale_and_swaps_in_a_fresh_one():
    vla = overfit_tiny("rationale_then_action")
    image, half_bin = example_image(), vla.processor.action_tokenizer.bin_width / 2 + 1e-6
    policy = Policy(vla, PolicyConfig(rationale_mode="async", rationale_every_n=1))
    try:
        first = policy.predict(image, INSTRUCTION)  # an episode's first step writes its rationale in the step
        assert first.rationale == RATIONALE and first.rationale_fresh and first.rationale_age_steps == 0
        second = policy.predict(image, INSTRUCTION)  # conditioned on the cache; a refresh starts on this image
        assert second.rationale == RATIONALE and not second.rationale_fresh and second.rationale_age_steps == 1
        fed = [policy.cached_rationale().ids]
        (expected,) = vla.generate([image], [INSTRUCTION], plan="action", fed_rationales=fed)
        np.testing.assert_array_equal(second.action, vla.processor.decode_actions(expected.action_bins))
        assert (np.abs(second.action - TARGET_ACTION) <= half_bin).all()
        assert policy.wait_background(60)
        third = policy.predict(image, INSTRUCTION)  # the refresh written on step 1's image is swapped in
        assert third.rationale_fresh and third.rationale == RATIONALE and third.rationale_age_steps == 1
        assert third.rationale_age_s >= 0.0
        other = policy.predict(image, "put the carrot on the plate")  # a new instruction: the cache is dropped
        assert other.rationale_fresh and other.rationale_age_steps == 0
        policy.reset()
        assert policy.predict(image, INSTRUCTION).rationale_age_steps == 0
        with pytest.raises(ConfigError, match="one live stream"):
            policy.predict_batch([image], [INSTRUCTION])
    finally:
        policy.close()


def test_background_decoding_yields_the_model_to_a_control_step_between_tokens():
    import threading
    import time

    import torch

    from refinevla_core.inference.background import GenerationCancelledError, ModelGate, TokenStreamer

    gate, cancel, order = ModelGate(), threading.Event(), []
    streamer = TokenStreamer(gate, cancel, on_tokens=lambda tokens: order.append(f"token {len(tokens)}"))
    holding = threading.Event()

    def control_step():
        holding.wait()
        with gate.control():
            order.append("control")

    control = threading.Thread(target=control_step)
    control.start()
    with gate.background():
        streamer.put(torch.tensor([[5, 6, 7]]))  # the prompt: not a new token
        holding.set()
        time.sleep(0.2)  # the control step is waiting now; it cannot get the model while a token is decoded
        order.append("decoding")
        streamer.put(torch.tensor([11]))  # between tokens: the control step goes first
        order.append("resumed")
        control.join(10)
        cancel.set()
        with pytest.raises(GenerationCancelledError):
            streamer.put(torch.tensor([12]))  # a new episode stops the generation at its next token
    assert order == ["decoding", "token 1", "control", "resumed", "token 2"]
    assert streamer.tokens == [11, 12]
