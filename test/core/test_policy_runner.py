"""PolicyRunner's rules without ROS: episodes, holds (camera, stamps, timing, model faults), lock-step, rationale ids.

The policies are the honest stand-ins of the Policy API the ROS tests load (test/ros/policies.py); clocks are
injected (`Clock`), so the rules about seconds are checked without sleeping.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

import numpy as np
import pytest

from refinevla_core.inference.config import PolicyConfig, RunnerConfig
from refinevla_core.inference.factory import PolicyLoadError, make_policy
from refinevla_core.inference.runner import LatestFrame, PolicyRunner, RunnerStats
from refinevla_core.inference.types import LateRationale, PolicyLike, PolicyOutput
from refinevla_core.safety import SafetyConfig
from test.ros.policies import FaultyPolicy, ImageMeanPolicy, RaisingPolicy, SlowPolicy

LIMITS = np.array(SafetyConfig().max_delta)
S = 1_000_000_000  # ns per second


class Clock:
    """Monotonic seconds and node-clock nanoseconds, advanced by hand."""

    def __init__(self, t: float = 100.0, ns: int = 1_700_000_000 * S) -> None:
        self.t, self.ns = t, ns

    def advance(self, seconds: float) -> None:
        self.t += seconds
        self.ns += int(seconds * S)

    def monotonic(self) -> float:
        return self.t

    def clock_ns(self) -> int:
        return self.ns


def make_runner(model: PolicyLike | None = None, **config) -> tuple[PolicyRunner, Clock, list[tuple[str, str]]]:
    clock, logged = Clock(), []
    runner = PolicyRunner(model or ImageMeanPolicy(), RunnerConfig(**config),
                          lambda level, msg: logged.append((level, msg)), clock_ns=clock.clock_ns,
                          monotonic=clock.monotonic)
    runner.start()
    return runner, clock, logged


def image(value: int) -> np.ndarray:
    return np.full((8, 8, 3), value, dtype=np.uint8)


def step(runner: PolicyRunner, clock: Clock, value: int = 100, stamp_ns: int | None = None):
    """An image arrives now (stamped now unless told) and a step runs on it."""
    stamp = clock.ns if stamp_ns is None else stamp_ns
    runner.image_arrived(stamp, clock.t)
    return runner.check_camera() or runner.step(image(value), stamp, clock.t)


def test_a_step_guards_the_model_action_and_stamps_it_with_its_image():
    runner, clock, _ = make_runner(max_instruction_chars=100)
    runner.set_instruction("push the cube")
    result = step(runner, clock, value=255)
    assert not result.step.safe_hold
    np.testing.assert_allclose(result.step.delta[:3], [0.04, 0.04, 0.04], rtol=1e-6)  # ImageMeanPolicy
    assert result.stamp_ns == clock.ns and result.output.rationale_fresh
    committed = runner.commit(result)
    assert (committed.step_index, committed.rationale_id, committed.publish_rationale) == (0, 1, True)


def test_no_instruction_holds_and_a_new_instruction_is_a_new_episode():
    policy = ImageMeanPolicy()
    runner, clock, logged = make_runner(policy)
    held = step(runner, clock)
    assert held.step.safe_hold and held.step.reason == "no instruction"
    assert any("no instruction yet" in m for _, m in logged)
    runner.set_instruction("a")
    for _ in range(3):
        clock.advance(0.2)
        runner.commit(step(runner, clock))
    assert policy.resets == 1 and runner.commit(runner.hold("x")).step_index == 3
    assert runner.set_instruction("a") == 2, "the same text again is a new episode"
    clock.advance(0.2)
    result = step(runner, clock)
    assert policy.resets == 2 and "episode 2, step 0" in result.output.rationale.situation_analysis
    assert runner.commit(result).step_index == 0, "the step count restarts with the episode"


def test_a_result_for_a_replaced_instruction_is_never_published():
    class ChangesItsMind(ImageMeanPolicy):
        def predict(self, image, instruction):
            out = super().predict(image, instruction)
            runner.set_instruction("something else")  # arrives while the model thinks
            return out

    runner, clock, _ = make_runner(ChangesItsMind())
    runner.set_instruction("first")
    assert step(runner, clock) is None


def test_no_image_and_images_that_stop_hold_and_warn_once():
    runner, clock, logged = make_runner(image_timeout_s=0.5)
    runner.set_instruction("go")
    assert runner.check_camera().step.reason.startswith("no camera image received yet")
    assert not step(runner, clock).step.safe_hold
    clock.advance(0.4)
    assert runner.check_camera() is None
    clock.advance(0.2)
    stale = runner.check_camera()
    assert stale.step.safe_hold and "stale camera image: the newest is 0.60 s old" in stale.step.reason
    clock.advance(1.0)
    assert runner.check_camera().step.safe_hold
    assert sum("stale camera image" in m for _, m in logged) == 1
    assert not step(runner, clock).step.safe_hold, "images again: motion resumes"


def test_a_frozen_camera_repeating_its_stamp_holds_once_the_frame_is_too_old():
    runner, clock, logged = make_runner(image_timeout_s=0.5, control_rate_hz=5.0)
    runner.set_instruction("go")
    frozen_stamp = clock.ns
    moving = []
    for _ in range(10):  # the driver keeps re-sending its last frame at 5 Hz for 2 s
        result = step(runner, clock, stamp_ns=frozen_stamp)
        moving.append(not result.step.safe_hold)
        clock.advance(0.2)
    assert moving[:3] == [True, True, True] and not any(moving[3:]), moving
    assert "frozen camera: images keep arriving with the same header stamp" in result.step.reason
    assert sum("frozen camera" in m for _, m in logged) == 1, "one clear warning"
    assert not step(runner, clock).step.safe_hold, "a new stamp: motion resumes"


def test_lock_step_re_sent_images_are_not_new_steps_and_do_not_freeze_the_camera():
    runner, clock, _ = make_runner(image_timeout_s=0.5, control_rate_hz=0.0)
    runner.set_instruction("go")
    stamp = 10 * S  # a simulator's own clock: far from the node's, never "too old" in lock-step
    assert not step(runner, clock, stamp_ns=stamp).step.safe_hold
    for _ in range(10):  # the simulator re-sends the image it waits on
        clock.advance(0.2)
        assert step(runner, clock, stamp_ns=stamp) is None
    runner.set_instruction("again")
    assert not step(runner, clock, stamp_ns=stamp).step.safe_hold, "a new episode steps on the same image"


def test_stamps_older_than_the_timeout_plus_tolerance_hold_with_one_warning():
    runner, clock, logged = make_runner(image_timeout_s=1.0, clock_offset_tolerance_s=0.5)
    runner.set_instruction("go")
    assert not step(runner, clock, stamp_ns=clock.ns - int(1.4 * S)).step.safe_hold, "within the tolerance"
    for _ in range(5):
        clock.advance(0.2)
        held = step(runner, clock, stamp_ns=clock.ns - 30 * S)
        assert held.step.safe_hold and not np.any(held.step.delta)
    assert "old camera stamp: the image is stamped 30.00 s before the node clock (limit 1.50 s" in held.step.reason
    assert sum("old camera stamp" in m for _, m in logged) == 1
    assert not step(runner, clock).step.safe_hold
    step(runner, clock, stamp_ns=clock.ns - 30 * S)
    assert sum("old camera stamp" in m for _, m in logged) == 2, "warned again after it recovered"


def test_unstamped_images_are_judged_by_arrival_and_that_is_said_once():
    runner, clock, logged = make_runner()
    runner.set_instruction("go")
    for _ in range(3):
        assert not step(runner, clock, stamp_ns=0).step.safe_hold
        clock.advance(0.2)
    assert sum("no header stamp" in m for _, m in logged) == 1


def test_inference_slower_than_the_image_timeout_holds():
    class Slow(ImageMeanPolicy):
        def predict(self, image, instruction):
            clock.advance(1.5)
            return super().predict(image, instruction)

    runner, clock, _ = make_runner(Slow(), image_timeout_s=1.0, clock_offset_tolerance_s=10.0)
    runner.set_instruction("go")
    result = step(runner, clock)
    assert result.step.safe_hold and result.step.reason.startswith("inference took too long: the image was 1.50 s")


def test_model_faults_are_held_or_clipped():
    runner, clock, _ = make_runner(FaultyPolicy())
    runner.set_instruction("go")
    reasons = []
    for _ in range(7):  # FAULTS: nan, inf, -inf, huge, nan_gripper, short, ok
        clock.advance(0.2)
        result = step(runner, clock)
        reasons.append(result.step.reason)
        assert np.all(np.abs(result.step.delta) <= LIMITS)
    assert all("non-finite" in r for r in reasons[:3]) and "non-finite" in reasons[4]
    assert "clipped" in reasons[3] and "has 6 values" in reasons[5] and reasons[6] == ""


def test_policy_exceptions_and_wrong_output_types_hold():
    runner, clock, _ = make_runner(RaisingPolicy())
    runner.set_instruction("go")
    held = step(runner, clock)
    assert held.step.safe_hold and held.step.reason == "policy error: RuntimeError: stand-in model failure"
    assert not step(runner, clock).step.safe_hold

    class Untyped(ImageMeanPolicy):
        def predict(self, image, instruction):
            return {"action": [0.0] * 7}

    runner, clock, _ = make_runner(Untyped())
    runner.set_instruction("go")
    assert "returned dict, not a PolicyOutput" in step(runner, clock).step.reason


def test_rationale_ids_follow_fresh_rationales_and_streaming_reserves_one():
    outputs = iter([
        PolicyOutput(np.zeros(7, np.float32), rationale_text="r1", rationale_fresh=False),  # first one: published
        PolicyOutput(np.zeros(7, np.float32), rationale_text="r1", rationale_fresh=False, rationale_age_steps=1),
        PolicyOutput(np.zeros(7, np.float32), rationale_text="r2", rationale_fresh=True, rationale_age_steps=0),
        PolicyOutput(np.zeros(7, np.float32)),  # action only
        PolicyOutput(np.zeros(7, np.float32), rationale_pending=Future()),  # streaming: written after the action
    ])

    class Scripted(ImageMeanPolicy):
        def predict(self, image, instruction):
            return next(outputs)

    runner, clock, _ = make_runner(Scripted())
    runner.set_instruction("go")
    committed = []
    for _ in range(5):
        clock.advance(0.2)
        committed.append(runner.commit(step(runner, clock)))
    assert [(c.rationale_id, c.publish_rationale) for c in committed] == [(1, True), (1, False), (2, True),
                                                                          (0, False), (3, False)]
    assert committed[4].pending is not None
    assert list(runner.stats.rationale_age_steps) == [1, 0]
    committed[4].pending.set_result(LateRationale(text="r3", rationale=None))


def test_the_node_is_told_once_which_rationale_mode_keeps_the_rate(monkeypatch):
    monkeypatch.setenv("REFINEVLA_TEST_POLICY_SECONDS", "0.03")  # 30 ms steps against a 10 ms period
    runner, clock, logged = make_runner(SlowPolicy(), control_rate_hz=100.0, image_timeout_s=5.0,
                                        policy=PolicyConfig(rationale_mode="every_n"))
    runner.set_instruction("go")
    for _ in range(8):
        step(runner, clock)
    advice = [m for _, m in logged if "control period" in m]
    assert len(advice) == 1 and "policy.rationale_mode:=async" in advice[0] and "streaming" in advice[0]


def test_latest_frame_ticks_once_per_new_payload_in_lock_step():
    frames, stop, stats = LatestFrame(), threading.Event(), RunnerStats()
    frames.put(b"a", 1.0)
    ticks = frames.ticks(0.0, 0.01, stop, stats)
    assert next(ticks) == (b"a", 1.0, True)
    assert next(ticks) == (b"a", 1.0, False), "no new payload: a watchdog-only tick"
    frames.put(b"b", 2.0)
    assert next(ticks) == (b"b", 2.0, True)
    stop.set()
    frames.wake()
    assert next(ticks, None) is None


def test_make_policy_builds_from_a_factory_and_names_what_to_fix():
    policy = make_policy(RunnerConfig(policy_factory="test.ros.policies:image_mean_policy"))
    assert isinstance(policy, PolicyLike)
    for config, words in [
        (RunnerConfig(), "no policy: set the parameter checkpoint"),
        (RunnerConfig(checkpoint="x", policy_factory="a:b"), "only one of"),
        (RunnerConfig(policy_factory="nocolon"), "must look like 'package.module:callable'"),
        (RunnerConfig(policy_factory="test.ros.policies:nothing_here"), "cannot be imported"),
        (RunnerConfig(policy_factory="test.ros.policies:not_a_policy"), "has no predict / reset method"),
        (RunnerConfig(checkpoint="/nonexistent/ckpt"), "does not exist"),
    ]:
        with pytest.raises(PolicyLoadError, match=words.replace("(", r"\(")):
            make_policy(config)
