"""policy_node in its own process over loopback DDS: what goes in, what comes out, and that nothing unsafe ever does.

The node loads stand-in policies from test/ros/policies.py through its real `policy_factory` parameter; everything
else (QoS, lifecycle services, std_srvs, DDS) is the real thing.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import rclpy.duration
from diagnostic_msgs.msg import DiagnosticArray
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState
from rclpy.qos import qos_profile_sensor_data
from rclpy.serialization import serialize_message
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Float64, String
from std_srvs.srv import SetBool, Trigger

from refinevla.msg import Action, EndEffectorDelta
from refinevla.msg import Rationale as RationaleMsg
from refinevla_core.safety import SafetyConfig
from refinevla_ros.conversions import msg_to_delta, rgb_to_compressed, rgb_to_image
from refinevla_ros.policy_node import INSTRUCTION_QOS
from test.ros.policies import CONSTANT_ACTION, FAULTS
from test.ros.rosutil import node_process, peer_node, spin_until

LIMITS = np.array(SafetyConfig().max_delta)
MODULE = "refinevla_ros.policy_node"


def policy_args(factory: str, *extra: str) -> list[str]:
    return ["-p", f"policy_factory:=test.ros.policies:{factory}", *[a for e in extra for a in ("-p", e)]]


class Outputs:
    """Everything the policy node publishes, as received by a peer node."""

    def __init__(self, node) -> None:
        self.actions: list[Action] = []
        self.deltas: list[EndEffectorDelta] = []
        self.grippers: list[float] = []
        self.rationales: list[str] = []
        self.structured: list[RationaleMsg] = []
        self.diagnostics: list[DiagnosticArray] = []
        self.overlays: list[Image] = []
        node.create_subscription(Action, "/refinevla/action", self.actions.append, 50)
        node.create_subscription(EndEffectorDelta, "/refinevla/ee_delta", self.deltas.append, 50)
        node.create_subscription(Float64, "/refinevla/gripper", lambda m: self.grippers.append(m.data), 50)
        node.create_subscription(String, "/refinevla/rationale", lambda m: self.rationales.append(m.data), 50)
        node.create_subscription(RationaleMsg, "/refinevla/rationale_structured", self.structured.append, 50)
        node.create_subscription(DiagnosticArray, "/diagnostics", self.diagnostics.append, 10)
        node.create_subscription(Image, "/refinevla/attention_overlay", self.overlays.append, qos_profile_sensor_data)

    def moving(self) -> list[Action]:
        return [a for a in self.actions if not a.safe_hold]

    def assert_all_safe(self) -> None:
        """Every command that left the node is finite and within the per-step limits; grippers within [0, 1]."""
        for msg in [a.delta for a in self.actions] + self.deltas:
            d = msg_to_delta(msg)
            assert np.all(np.isfinite(d)), d
            assert np.all(np.abs(d) <= LIMITS + 1e-12), d
        for a in self.actions:
            assert math.isfinite(a.gripper) and 0.0 <= a.gripper <= 1.0, a
            if a.safe_hold:
                assert not np.any(msg_to_delta(a.delta)), "a hold is zero motion"
                assert a.guard_reason, "a hold says why"
        assert all(math.isfinite(g) and 0.0 <= g <= 1.0 for g in self.grippers), self.grippers


def image(value: int, h: int = 24, w: int = 32) -> np.ndarray:
    return np.full((h, w, 3), value, dtype=np.uint8)


def test_image_and_instruction_in_delta_gripper_rationale_out():
    with peer_node("policy_peer") as (node, ex):
        out = Outputs(node)
        # published BEFORE the node exists: transient-local QoS must still deliver it
        instruction = node.create_publisher(String, "/refinevla/instruction", INSTRUCTION_QOS)
        instruction.publish(String(data="pick up the  red cube"))
        camera = node.create_publisher(Image, "/camera/image_raw", 10)
        stamps = []

        def publish_image():
            msg = rgb_to_image(image(120))
            msg.header.stamp = node.get_clock().now().to_msg()
            stamps.append((msg.header.stamp.sec, msg.header.stamp.nanosec))
            camera.publish(msg)

        with node_process(MODULE, policy_args("constant_policy", "control_rate_hz:=10.0",
                                              "delta_frame_id:=wx250s/base_link")) as proc:
            assert spin_until(ex, lambda: len(out.moving()) >= 3 and out.rationales and out.grippers
                              and out.diagnostics, 60, every=publish_image), proc.output()
            action = out.moving()[-1]
            expected = np.clip(CONSTANT_ACTION[:6], -LIMITS, LIMITS)
            np.testing.assert_allclose(msg_to_delta(action.delta), expected, rtol=1e-6)
            assert action.gripper == 0.0 and out.grippers[-1] == 0.0  # Bridge: 0 = closed
            assert "clipped x, yaw" in action.guard_reason
            assert action.header.frame_id == "wx250s/base_link"
            assert (action.header.stamp.sec, action.header.stamp.nanosec) in stamps, "stamped with its image"
            assert action.inference_latency_ms >= 0.0
            delta = next(d for d in out.deltas if d.x != 0.0)
            np.testing.assert_allclose(msg_to_delta(delta), expected, rtol=1e-6)
            assert "instruction 'pick up the red cube'; episode 1" in out.rationales[-1]
            assert out.rationales[-1].startswith("Observation: image 32x24 mean RGB (120, 120, 120)")
            ids = {r.id for r in out.structured}
            assert action.rationale_id in ids and all(r.fresh for r in out.structured)
            assert out.structured[-1].text == out.rationales[-1]
            status = out.diagnostics[-1].status[0]
            values = {kv.key: kv.value for kv in status.values}
            assert values["state"] == "active" and int(values["steps"]) > 0

            # a new instruction is a new episode: the policy is reset and the step count restarts
            instruction.publish(String(data="open the drawer"))
            assert spin_until(ex, lambda: any("episode 2, step 0" in r.situation_analysis for r in out.structured)
                              and out.actions[-1].rationale_id > out.structured[-1].id - 1, 60,
                              every=publish_image), proc.output()
            first = next(r for r in out.structured if "episode 2, step 0" in r.situation_analysis)
            assert "'open the drawer'" in first.situation_analysis
            assert spin_until(ex, lambda: any(a.rationale_id == first.id for a in out.actions), 30)
            assert next(a for a in out.actions if a.rationale_id == first.id).step == 0
            n_before_stop = len(out.actions)
            assert proc.alive()
        # SIGINT: the last thing the node publishes is a zero step
        assert proc.proc.returncode == 0, proc.output()
        spin_until(ex, lambda: out.actions[-1].guard_reason == "shutting down", 5)
        assert len(out.actions) > n_before_stop
        last = out.actions[-1]
        assert last.safe_hold and last.guard_reason == "shutting down" and not np.any(msg_to_delta(last.delta))
        out.assert_all_safe()


def test_watchdog_images_stop_then_motion_stops_and_it_warns_once():
    timeout = 0.5
    with peer_node("watchdog_peer") as (node, ex):
        out = Outputs(node)
        node.create_publisher(String, "/refinevla/instruction", INSTRUCTION_QOS).publish(String(data="push it"))
        camera = node.create_publisher(Image, "/camera/image_raw", 10)
        with node_process(MODULE, policy_args("image_mean_policy", "control_rate_hz:=10.0",
                                              f"image_timeout_s:={timeout}")) as proc:
            sent_at = []

            def publish_image():
                camera.publish(rgb_to_image(image(200)))
                sent_at.append(time.monotonic())

            assert spin_until(ex, lambda: len(out.moving()) >= 3, 60, every=publish_image), proc.output()
            last_image_sent = sent_at[-1]
            warnings_before = proc.output().count("stale camera image")  # a loaded machine may have paused the camera
            n = len(out.actions)

            def stale_hold_seen() -> bool:
                return any("stale camera image" in a.guard_reason for a in out.actions[n:])

            assert spin_until(ex, stale_hold_seen, 30), proc.output()
            assert time.monotonic() - last_image_sent > timeout, "the watchdog never trips early"
            first_stale = next(i for i, a in enumerate(out.actions) if i >= n and "stale" in a.guard_reason)
            spin_until(ex, lambda: len(out.actions) > first_stale + 5, 30)
            after = out.actions[first_stale:]
            assert all(a.safe_hold and "stale camera image" in a.guard_reason for a in after)
            assert all(not np.any(msg_to_delta(a.delta)) for a in after)
            # images again: motion resumes
            n = len(out.actions)
            assert spin_until(ex, lambda: any(not a.safe_hold for a in out.actions[n:]), 30,
                              every=lambda: camera.publish(rgb_to_image(image(200)))), proc.output()
            assert proc.alive()
            log = proc.output()
            assert log.count("stale camera image") == warnings_before + 1, "warned once for the stale period"
        assert "publishing zero motion until images arrive" in log
        out.assert_all_safe()


def _raw_string(payload: bytes) -> bytes:
    """A serialized std_msgs/String carrying arbitrary bytes (what a non-UTF-8 publisher puts on the wire)."""
    header = serialize_message(String(data=""))[:4]
    return header + (len(payload) + 1).to_bytes(4, "little") + payload + b"\x00"


def test_bad_input_corpus_keeps_the_node_alive_and_publishes_nothing_unsafe():
    with peer_node("corpus_peer") as (node, ex):
        out = Outputs(node)
        instruction = node.create_publisher(String, "/refinevla/instruction", INSTRUCTION_QOS)
        instruction.publish(String(data="stack the blocks"))
        camera = node.create_publisher(Image, "/camera/image_raw", 10)
        with node_process(MODULE, policy_args("image_mean_policy", "control_rate_hz:=20.0")) as proc:
            assert spin_until(ex, lambda: len(out.moving()) >= 2, 60,
                              every=lambda: camera.publish(rgb_to_image(image(51)))), proc.output()

            wrong_encoding = rgb_to_image(image(10))
            wrong_encoding.encoding = "bgra16"
            short_step = rgb_to_image(image(10))
            short_step.step = 10
            truncated = rgb_to_image(image(10))
            truncated.data = bytes(truncated.data)[:100]
            empty = Image(height=0, width=0, encoding="rgb8", step=0)
            oversized = rgb_to_image(image(10))
            oversized.width, oversized.height, oversized.step = 100000, 100000, 300000
            corpus = [(wrong_encoding, "bgra16"), (short_step, "step 10"), (truncated, "truncated"),
                      (empty, "0x0"), (oversized, "pixel limit")]
            for bad, words in corpus:
                n = len(out.actions)
                ok = spin_until(ex, lambda n=n, words=words: any(words in a.guard_reason for a in out.actions[n:]),
                                30, every=lambda bad=bad: camera.publish(bad))
                assert ok, f"no hold for {words}:\n{proc.output()}"
                assert words in proc.output()
                assert proc.alive()

            # a padded row stride (step > width*3) is valid and decodes to the right pixels
            padded = rgb_to_image(image(204))
            padded.step = 32 * 3 + 8
            padded.data = b"".join(bytes(padded.data)[r * 96:(r + 1) * 96] + b"\xff" * 8 for r in range(24))
            assert spin_until(ex, lambda: any(not a.safe_hold and a.delta.x == pytest.approx(0.032)
                                              for a in out.actions), 30, every=lambda: camera.publish(padded))

            bad_instructions = [
                (String(data=""), "instruction is empty"),
                (String(data=" \t\n "), "instruction is empty"),
                (String(data="x" * (10 * 1024 * 1024)), "the limit is 2000"),
                (_raw_string(b"pick \xff\xfe up"), "not valid UTF-8"),
            ]
            for bad, words in bad_instructions:
                count = proc.output().count(words)
                instruction.publish(bad)
                assert spin_until(ex, lambda words=words, count=count: proc.output().count(words) > count, 60,
                                  every=lambda: camera.publish(rgb_to_image(image(51)))), proc.output()
                assert proc.alive()
            # nothing was lost: the last good instruction is still the one in use
            n = len(out.rationales)
            assert spin_until(ex, lambda: len(out.rationales) > n + 1, 30,
                              every=lambda: camera.publish(rgb_to_image(image(51))))
            assert "instruction 'stack the blocks'" in out.rationales[-1]
            assert "Keeping the current instruction 'stack the blocks'" in proc.output()
            assert proc.alive()
        out.assert_all_safe()


def test_faulty_model_outputs_are_held_or_clipped_never_published():
    with peer_node("faulty_peer") as (node, ex):
        out = Outputs(node)
        node.create_publisher(String, "/refinevla/instruction", INSTRUCTION_QOS).publish(String(data="go"))
        camera = node.create_publisher(Image, "/camera/image_raw", 10)
        with node_process(MODULE, policy_args("faulty_policy", "control_rate_hz:=20.0")) as proc:
            def model_steps():
                return [a for a in out.actions if a.rationale_id > 0]

            assert spin_until(ex, lambda: len(model_steps()) >= 2 * len(FAULTS), 60,
                              every=lambda: camera.publish(rgb_to_image(image(80)))), proc.output()
            assert proc.alive()
        steps = model_steps()
        by_fault: dict[str, list[Action]] = {}
        for a in steps:  # the rationale id counts predict() calls: fault = FAULTS[(id - 1) % len]
            by_fault.setdefault(FAULTS[(a.rationale_id - 1) % len(FAULTS)], []).append(a)
        for fault in ("nan", "inf", "-inf", "nan_gripper"):
            assert all(a.safe_hold and "non-finite" in a.guard_reason for a in by_fault[fault]), fault
        assert all(a.safe_hold and "has 6 values" in a.guard_reason for a in by_fault["short"])
        for a in by_fault["huge"]:  # finite but absurd: clipped to the limits, gripper into [0, 1]
            assert not a.safe_hold
            np.testing.assert_allclose(msg_to_delta(a.delta), LIMITS)
            assert a.gripper == 1.0
        assert all(not a.safe_hold and a.delta.x == pytest.approx(0.01) for a in by_fault["ok"])
        log = proc.output()
        assert "non-finite" in log and "model output replaced by a hold" in log
        out.assert_all_safe()


def test_policy_exceptions_hold_still_and_the_node_survives():
    with peer_node("raising_peer") as (node, ex):
        out = Outputs(node)
        node.create_publisher(String, "/refinevla/instruction", INSTRUCTION_QOS).publish(String(data="go"))
        camera = node.create_publisher(Image, "/camera/image_raw", 10)
        with node_process(MODULE, policy_args("raising_policy", "control_rate_hz:=20.0")) as proc:
            assert spin_until(ex, lambda: any("policy error" in a.guard_reason for a in out.actions)
                              and len(out.moving()) >= 2, 60,
                              every=lambda: camera.publish(rgb_to_image(image(80)))), proc.output()
            assert proc.alive()
        assert "stand-in model failure" in proc.output()
        out.assert_all_safe()


def _call(ex, client, request, timeout: float = 30.0):
    assert client.wait_for_service(timeout_sec=timeout), f"service {client.srv_name} not available"
    future = client.call_async(request)
    assert spin_until(ex, future.done, timeout), f"no response from {client.srv_name}"
    return future.result()


def test_lifecycle_stop_enable_while_a_slow_model_is_thinking(tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    env = {"REFINEVLA_TEST_POLICY_MARKERS": str(markers), "REFINEVLA_TEST_POLICY_SECONDS": "1.5"}
    with peer_node("lifecycle_peer") as (node, ex):
        out = Outputs(node)
        node.create_publisher(String, "/refinevla/instruction", INSTRUCTION_QOS).publish(String(data="wipe"))
        camera = node.create_publisher(Image, "/camera/image_raw", 10)
        change_state = node.create_client(ChangeState, "/policy_node/change_state")
        stop = node.create_client(Trigger, "/policy_node/stop")
        enable = node.create_client(SetBool, "/policy_node/enable")
        sent = []

        def publish_image():  # 30 Hz camera, each frame a different brightness
            value = len(sent) % 250
            sent.append(value)
            camera.publish(rgb_to_image(image(value)))

        args = policy_args("slow_policy", "autostart:=false", "control_rate_hz:=5.0", "image_timeout_s:=5.0")
        with node_process(MODULE, args, env=env) as proc:
            # unconfigured: nothing is published however many images arrive
            assert change_state.wait_for_service(timeout_sec=60)
            spin_until(ex, lambda: False, 0.5, every=publish_image, period=0.033)
            assert not out.actions
            for transition in (Transition.TRANSITION_CONFIGURE, Transition.TRANSITION_ACTIVATE):
                assert _call(ex, change_state, ChangeState.Request(transition=Transition(id=transition))).success

            # an inference is in flight (start marker, no end marker): services still answer at once
            assert spin_until(ex, lambda: any(markers.glob("predict-start-*")), 60, every=publish_image, period=0.033)
            in_flight = sorted(markers.glob("predict-start-*"))[-1].name.split("-")[-1]
            response = _call(ex, stop, Trigger.Request())
            assert response.success and "enable" in response.message
            assert not (markers / f"predict-end-{in_flight}").exists(), "the executor was blocked by inference"
            # the in-flight result is not published: after the stop only holds, until enabled again
            assert spin_until(ex, (markers / f"predict-end-{in_flight}").exists, 30, every=publish_image)
            spin_until(ex, lambda: False, 1.0, every=publish_image, period=0.033)
            stopped_at = next(i for i, a in enumerate(out.actions) if a.guard_reason == "stopped by ~/stop")
            assert all(a.safe_hold for a in out.actions[stopped_at:]), [a.guard_reason for a in out.actions]

            sent.clear()
            assert _call(ex, enable, SetBool.Request(data=True)).success
            n = len(out.actions)
            assert spin_until(ex, lambda: len([a for a in out.actions[n:] if not a.safe_hold]) >= 2, 60,
                              every=publish_image, period=0.033), proc.output()
            # latest image wins: a 1.5 s step under a 30 Hz camera skips many frames, no queue builds up
            used = [round(a.delta.x / 0.04 * 255) for a in out.actions[n:] if not a.safe_hold]
            assert all(b - a > 1 for a, b in itertools.pairwise(used)), used

            assert _call(ex, change_state, ChangeState.Request(
                transition=Transition(id=Transition.TRANSITION_DEACTIVATE))).success
            spin_until(ex, lambda: False, 2.0, every=publish_image, period=0.033)
            deactivated_at = max(i for i, a in enumerate(out.actions) if a.guard_reason == "deactivated")
            assert deactivated_at == len(out.actions) - 1, "nothing is published once deactivated"
            assert proc.alive()
        out.assert_all_safe()


def test_compressed_camera_and_attention_overlay():
    with peer_node("compressed_peer") as (node, ex):
        out = Outputs(node)
        node.create_publisher(String, "/refinevla/instruction", INSTRUCTION_QOS).publish(String(data="look"))
        camera = node.create_publisher(CompressedImage, "/camera/image_raw/compressed", 10)
        rgb = np.zeros((24, 32, 3), dtype=np.uint8)
        rgb[:, :, 2] = 90
        with node_process(MODULE, policy_args("attention_policy", "image_transport:=compressed",
                                              "publish_attention:=true", "control_rate_hz:=10.0")) as proc:
            assert spin_until(ex, lambda: out.overlays and out.moving(), 60,
                              every=lambda: camera.publish(rgb_to_compressed(rgb, fmt="png"))), proc.output()
        overlay = np.frombuffer(bytes(out.overlays[-1].data), np.uint8).reshape(24, 32, 3)
        assert np.all(overlay[:, :, 0] == 255) and np.all(overlay[:, :, 2] == 90)
        assert "mean RGB (0, 0, 90)" in out.rationales[-1]


def test_configure_failure_is_reported_and_publishes_nothing():
    with peer_node("failure_peer") as (node, ex):
        out = Outputs(node)
        camera = node.create_publisher(Image, "/camera/image_raw", 10)
        node.create_publisher(String, "/refinevla/instruction", INSTRUCTION_QOS).publish(String(data="go"))
        with node_process(MODULE, policy_args("not_a_policy")) as proc:
            assert spin_until(ex, lambda: "autostart failed" in proc.output(), 60,
                              every=lambda: camera.publish(rgb_to_image(image(1))))
            spin_until(ex, lambda: False, 1.0, every=lambda: camera.publish(rgb_to_image(image(1))))
            assert proc.alive(), "a lifecycle node stays up, unconfigured, for a retry"
        log = proc.output()
        assert "has no predict / reset method" in log
        assert not out.actions and not out.deltas


@pytest.mark.parametrize(("args", "words"), [
    (["-p", "control_rate_hz:=-1.0"], "control_rate_hz must be >= 0"),
    (["-p", "safety.max_delta:=[0.05, 0.05]"], "max_delta"),
    (["-p", "image_transport:=h264"], "image_transport"),
    (["-p", "control_rate_hz:=5"], "control_rate_hz"),
])
def test_bad_parameters_exit_with_the_parameter_named(args, words):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", MODULE, "--ros-args", *args], capture_output=True, text=True,
                       timeout=120, cwd=Path(__file__).resolve().parents[2], env=os.environ.copy())
    assert r.returncode == 2, r.stdout + r.stderr
    assert words in r.stderr


def test_a_real_trained_checkpoint_drives_the_node_end_to_end(tmp_path):
    """The real Policy.from_checkpoint path: a tiny ReFineVLA taught one (image, instruction) -> (rationale, action)
    pair; the node must publish exactly what the same checkpoint predicts in-process, and its rationale."""
    from refinevla_core.inference.policy import Policy, PolicyConfig
    from refinevla_core.model.checkpoint import save_checkpoint
    from test.core.model_util import INSTRUCTION, RATIONALE, TARGET_ACTION, example_image, overfit_tiny

    vla = overfit_tiny("rationale_then_action")
    checkpoint = save_checkpoint(tmp_path / "tiny", vla, vla.processor, vla.stats, vla.refinevla_config)
    rgb = example_image()
    config = PolicyConfig(rationale_mode="every_n", rationale_every_n=3, torch_threads=1)
    expected = Policy.from_checkpoint(checkpoint, config=config).predict(rgb, INSTRUCTION)
    half_bin = vla.processor.action_tokenizer.bin_width / 2 + 1e-6
    assert (np.abs(expected.action - TARGET_ACTION) <= half_bin).all()

    with peer_node("checkpoint_peer") as (node, ex):
        out = Outputs(node)
        node.create_publisher(String, "/refinevla/instruction", INSTRUCTION_QOS).publish(String(data=INSTRUCTION))
        camera = node.create_publisher(Image, "/camera/image_raw", 10)
        args = ["-p", f"checkpoint:={checkpoint}", "-p", "policy.rationale_mode:=every_n",
                "-p", "policy.rationale_every_n:=3", "-p", "policy.torch_threads:=1", "-p", "control_rate_hz:=5.0",
                "-p", "image_timeout_s:=30.0"]
        with node_process(MODULE, args) as proc:
            assert spin_until(ex, lambda: len(out.moving()) >= 4 and len(out.structured) >= 2, 120,
                              every=lambda: camera.publish(rgb_to_image(rgb)), period=0.1), proc.output()
            assert proc.alive()
    moving = out.moving()
    for action in moving:
        np.testing.assert_array_equal(msg_to_delta(action.delta), expected.action[:6].astype(np.float64))
        assert action.gripper == float(expected.action[6])
        assert action.guard_reason == ""
    assert out.rationales[0] == RATIONALE.text()
    assert out.structured[0].observation == RATIONALE.observation and out.structured[0].fresh
    # every_n = 3: steps 0..2 share the first rationale, step 3 brings a fresh one
    assert [a.rationale_id for a in moving[:4]] == [1, 1, 1, 2]
    assert len(out.structured) >= 2


def test_lock_step_mode_steps_once_per_new_image_and_still_watches_the_camera():
    """control_rate_hz 0 (sim.launch.py, the benchmark): a re-sent image (same stamp) is not a new step; the watchdog
    still holds when images stop."""
    with peer_node("lockstep_peer") as (node, ex):
        out = Outputs(node)
        node.create_publisher(String, "/refinevla/instruction", INSTRUCTION_QOS).publish(String(data="push"))
        camera = node.create_publisher(Image, "/camera/image_raw", 10)

        def stamped(sec: int) -> Image:
            msg = rgb_to_image(image(sec))
            msg.header.stamp.sec = sec
            return msg

        with node_process(MODULE, policy_args("image_mean_policy", "control_rate_hz:=0.0",
                                              "image_timeout_s:=0.5")) as proc:
            assert spin_until(ex, out.moving, 60, every=lambda: camera.publish(stamped(10))), proc.output()
            for sec in (11, 12):
                for _ in range(3):  # the same image three times: one step
                    camera.publish(stamped(sec))
                    spin_until(ex, lambda: False, 0.1)
                assert spin_until(ex, lambda sec=sec: any(a.header.stamp.sec == sec for a in out.moving()), 30)
            spin_until(ex, lambda: any("stale camera image" in a.guard_reason for a in out.actions), 30)
            assert proc.alive()
        steps = [a.header.stamp.sec for a in out.moving()]
        assert steps.count(11) == 1 and steps.count(12) == 1, steps
        assert out.actions[-1].safe_hold, "no images: the watchdog holds in lock-step mode too"
        out.assert_all_safe()


def test_rationales_that_do_not_parse_are_published_as_generated_and_the_action_still_goes_out():
    with peer_node("unparsed_peer") as (node, ex):
        out = Outputs(node)
        node.create_publisher(String, "/refinevla/instruction", INSTRUCTION_QOS).publish(String(data="push"))
        camera = node.create_publisher(Image, "/camera/image_raw", 10)
        with node_process(MODULE, policy_args("unparsed_rationale_policy", "control_rate_hz:=20.0")) as proc:
            assert spin_until(ex, lambda: len(out.structured) >= 6 and len(out.moving()) >= 6, 60,
                              every=lambda: camera.publish(rgb_to_image(image(7)))), proc.output()
        cut = "Observation: red cube\nSituation Analysis: the gripper is"
        raw = [r for r in out.structured if r.text == cut and not r.observation]
        duck = [r for r in out.structured if r.text == cut and r.observation == "red cube"]
        full = [r for r in out.structured if r.text.startswith("Observation: image 32x24")]
        assert raw and duck and full, [(r.observation, r.text[:30]) for r in out.structured]
        assert duck[0].situation_analysis == "the gripper is" and duck[0].task_planning == ""
        assert cut in out.rationales
        assert all(a.guard_reason != "" and "internal error" not in a.guard_reason for a in out.moving())
        assert not [a for a in out.actions if "internal error" in a.guard_reason]
        assert "could not be published" not in proc.output()


def test_a_frozen_camera_and_old_stamps_hold_with_a_reason_and_one_warning():
    """Images keep arriving but repeat one header stamp (a frozen driver re-sending its last frame), then arrive
    stamped 30 s in the past: both hold still with a reason, each warned once; fresh stamps move again."""
    timeout = 0.5
    with peer_node("frozen_peer") as (node, ex):
        out = Outputs(node)
        node.create_publisher(String, "/refinevla/instruction", INSTRUCTION_QOS).publish(String(data="push"))
        camera = node.create_publisher(Image, "/camera/image_raw", 10)

        def publish(stamp_offset_s: float | None = None, frozen=None):
            msg = rgb_to_image(image(150))
            now = node.get_clock().now()
            msg.header.stamp = frozen if frozen is not None else (now - rclpy.duration.Duration(
                seconds=stamp_offset_s or 0.0)).to_msg()
            camera.publish(msg)

        with node_process(MODULE, policy_args("image_mean_policy", "control_rate_hz:=10.0",
                                              f"image_timeout_s:={timeout}")) as proc:
            assert spin_until(ex, lambda: len(out.moving()) >= 3, 60, every=publish), proc.output()
            frozen = node.get_clock().now().to_msg()
            n = len(out.actions)
            assert spin_until(ex, lambda: any("frozen camera" in a.guard_reason for a in out.actions[n:]), 30,
                              every=lambda: publish(frozen=frozen)), proc.output()
            first = next(i for i, a in enumerate(out.actions) if i >= n and "frozen camera" in a.guard_reason)
            spin_until(ex, lambda: len(out.actions) > first + 10, 30, every=lambda: publish(frozen=frozen))
            assert all(a.safe_hold and not np.any(msg_to_delta(a.delta)) for a in out.actions[first:])
            moved_while_frozen = [a for a in out.actions[n:first] if not a.safe_hold]
            assert all(a.header.stamp == frozen for a in moved_while_frozen[1:]), "only the frozen frame"

            n = len(out.actions)  # fresh stamps: motion resumes
            assert spin_until(ex, lambda: any(not a.safe_hold for a in out.actions[n:]), 30, every=publish)
            n = len(out.actions)
            assert spin_until(ex, lambda: sum("old camera stamp" in a.guard_reason for a in out.actions[n:]) >= 10,
                              30, every=lambda: publish(stamp_offset_s=30.0)), proc.output()
            old = [a for a in out.actions[n:] if "old camera stamp" in a.guard_reason]
            assert "stamped 30." in old[0].guard_reason and "image_timeout_s + clock_offset_tolerance_s" in \
                old[0].guard_reason
            assert not any(not a.safe_hold for a in out.actions[n + 1:]), "no motion from old-stamped images"
            assert proc.alive()
        log = proc.output()
        assert log.count("frozen camera") == 1 and log.count("old camera stamp") == 1, log
        out.assert_all_safe()


@pytest.mark.parametrize(("module", "args", "words"), [
    (MODULE, ["-p", "image_timeot_s:=0.5"], "'image_timeot_s' (did you mean image_timeout_s?)"),
    (MODULE, ["-p", "policy.rationale_mod:=every_step"], "(did you mean policy.rationale_mode?)"),
    ("refinevla_ros.widowx_node", ["-p", "safety.max_detla:=[0.1, 0.1, 0.1, 0.1, 0.1, 0.1]"],
     "(did you mean safety.max_delta?)"),
    ("refinevla_ros.sim_bridge_node", ["-p", "step_mod:=lockstep"], "(did you mean step_mode?)"),
])
def test_unknown_parameters_stop_the_node_naming_the_closest_key(module, args, words):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", module, "--ros-args", *args], capture_output=True, text=True,
                       timeout=120, cwd=Path(__file__).resolve().parents[2], env=os.environ.copy())
    assert r.returncode != 0, r.stdout + r.stderr
    assert "unknown parameter" in r.stderr and words in r.stderr, r.stderr


def test_a_misspelt_key_in_a_params_file_stops_the_node(tmp_path):
    import subprocess
    import sys

    params = tmp_path / "policy.yaml"
    params.write_text("policy_node:\n  ros__parameters:\n    image_timeot_s: 0.5\n    safety:\n"
                      "      max_delta: [0.05, 0.05, 0.05, 0.25, 0.25, 0.25]\n")
    r = subprocess.run([sys.executable, "-m", MODULE, "--ros-args", "--params-file", str(params)],
                       capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2],
                       env=os.environ.copy())
    assert r.returncode == 2, r.stdout + r.stderr
    assert "'image_timeot_s' (did you mean image_timeout_s?)" in r.stderr
    assert "max_delta'" not in r.stderr, "known keys are not reported"


@pytest.mark.parametrize(("order", "mode"), [("action_then_rationale", "streaming"),
                                             ("rationale_then_action", "async")])
def test_streaming_and_async_rationales_carry_the_ids_and_ages_their_actions_name(tmp_path, order, mode):
    """Real tiny checkpoints taught one (image, instruction) -> (rationale, action): the node publishes every action
    at once and each rationale, written in the background, under the id an Action carried."""
    from refinevla_core.model.checkpoint import save_checkpoint
    from test.core.model_util import INSTRUCTION, RATIONALE, TARGET_ACTION, example_image, overfit_tiny

    vla = overfit_tiny(order)
    checkpoint = save_checkpoint(tmp_path / "tiny", vla, vla.processor, vla.stats, vla.refinevla_config)
    rgb, half_bin = example_image(), vla.processor.action_tokenizer.bin_width / 2 + 1e-6
    with peer_node(f"{mode}_peer") as (node, ex):
        out = Outputs(node)
        node.create_publisher(String, "/refinevla/instruction", INSTRUCTION_QOS).publish(String(data=INSTRUCTION))
        camera = node.create_publisher(Image, "/camera/image_raw", 10)

        def publish():
            msg = rgb_to_image(rgb)
            msg.header.stamp = node.get_clock().now().to_msg()
            camera.publish(msg)

        args = ["-p", f"checkpoint:={checkpoint}", "-p", f"policy.rationale_mode:={mode}",
                "-p", "policy.rationale_every_n:=2", "-p", "policy.torch_threads:=1", "-p", "control_rate_hz:=2.0",
                "-p", "image_timeout_s:=30.0"]
        with node_process(MODULE, args) as proc:
            def age_reported() -> bool:
                return any({kv.key: kv.value for kv in d.status[0].values}["rationale_age_s_last"] != ""
                           for d in out.diagnostics)

            assert spin_until(ex, lambda: len(out.moving()) >= 6 and len(out.structured) >= 2 and age_reported(),
                              180, every=publish, period=0.1), proc.output()
            assert proc.alive()
    moving = out.moving()
    for action in moving:
        assert np.all(np.abs(msg_to_delta(action.delta) - TARGET_ACTION[:6]) <= np.broadcast_to(half_bin, 7)[:6])
        assert action.guard_reason == ""
    assert all(r.text == RATIONALE.text() and r.observation == RATIONALE.observation for r in out.structured)
    by_id: dict[int, Action] = {}
    for a in out.actions:
        by_id.setdefault(a.rationale_id, a)
    for r in out.structured:  # each rationale names the step (and image) of the first Action that carried its id
        assert r.id in by_id and r.header.stamp == by_id[r.id].header.stamp and r.step == by_id[r.id].step
    if mode == "streaming":  # due steps announce a rationale still being written; the ones in between are action-only
        assert {a.rationale_age_steps for a in moving if a.rationale_id} == {0}
        # in between: the age of the newest finished rationale (-1 while the episode's first is still being written)
        assert any(a.rationale_id == 0 and a.rationale_age_steps > 0 and a.rationale_age_s > 0 for a in moving)
    else:  # every action is conditioned on a cached rationale; refreshes are swapped in while control goes on
        assert all(a.rationale_id > 0 and a.rationale_age_steps >= 0 for a in moving)
        assert max(a.rationale_age_steps for a in moving) >= 1
    values = [{kv.key: kv.value for kv in d.status[0].values} for d in out.diagnostics]
    assert all(v["rationale_mode"] == mode for v in values)
    assert any(v["rationale_age_steps_last"] != "" and float(v["rationale_age_s_last"]) >= 0 for v in values), values
    out.assert_all_safe()
