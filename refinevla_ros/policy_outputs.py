"""The policy node's output topics and how one runner step becomes messages on them, kept apart from the node's
lifecycle and threading so policy_node.py reads as wiring.

Per step: /refinevla/ee_delta (the guarded delta), /refinevla/gripper (not on a hold: the gripper keeps its last
command), /refinevla/action (everything, with rationale id and age), and the rationale on /refinevla/rationale +
/refinevla/rationale_structured when one is written (streaming: later, with the id its Action carried).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.node import Node
from sensor_msgs.msg import Image
from std_msgs.msg import Float64, Header, String

from refinevla.msg import Action, EndEffectorDelta
from refinevla.msg import Rationale as RationaleMsg
from refinevla_core.inference.runner import Committed, StepResult
from refinevla_ros.conversions import delta_to_msg, rationale_to_msg, rgb_to_image
from refinevla_ros.topics import (
    ACTION_TOPIC,
    ATTENTION_TOPIC,
    CAMERA_QOS,
    COMMAND_QOS,
    EE_DELTA_TOPIC,
    GRIPPER_TOPIC,
    RATIONALE_STRUCTURED_TOPIC,
    RATIONALE_TOPIC,
)

# interfaces built before Action.rationale_age_* existed (re-run ./setup.sh to rebuild them) still work
_ACTION_HAS_AGE = "rationale_age_steps" in Action.get_fields_and_field_types()


class PolicyOutputs:
    """Publishers of one policy node; every method may be called from the worker thread."""

    def __init__(self, node: Node, attention: bool) -> None:
        self.node = node
        self.pubs = {name: node.create_publisher(msg_type, topic, COMMAND_QOS) for name, msg_type, topic in (
            ("ee_delta", EndEffectorDelta, EE_DELTA_TOPIC), ("gripper", Float64, GRIPPER_TOPIC),
            ("rationale", String, RATIONALE_TOPIC), ("action", Action, ACTION_TOPIC),
            ("rationale_structured", RationaleMsg, RATIONALE_STRUCTURED_TOPIC))}
        if attention:
            self.pubs["attention"] = node.create_publisher(Image, ATTENTION_TOPIC, CAMERA_QOS)

    def step(self, result: StepResult, committed: Committed, header: Header) -> str:
        """Publish the step (and its rationale when it is due now); returns a warning for a rationale that could
        not be published, or "" (the action goes out regardless)."""
        step, out = result.step, result.output
        problem = ""
        if committed.publish_rationale and out is not None:
            problem = self.rationale(out.rationale, out.rationale_text, header, committed, out.rationale_fresh)
        delta = delta_to_msg(step.delta, header)
        self.pubs["ee_delta"].publish(delta)
        if not step.safe_hold:
            self.pubs["gripper"].publish(Float64(data=float(step.gripper)))
        action = Action(header=header, delta=delta, gripper=float(step.gripper), step=committed.step_index,
                        inference_latency_ms=float(result.latency_ms), rationale_id=committed.rationale_id,
                        safe_hold=step.safe_hold, guard_reason=step.reason)
        if _ACTION_HAS_AGE and out is not None:
            action.rationale_age_steps, action.rationale_age_s = out.rationale_age_steps, float(out.rationale_age_s)
        elif _ACTION_HAS_AGE:
            action.rationale_age_steps, action.rationale_age_s = -1, -1.0
        self.pubs["action"].publish(action)
        return problem

    def rationale(self, rationale: Any, text: str, header: Header, committed: Committed, fresh: bool) -> str:
        """String + refinevla/Rationale as generated (text that did not parse keeps its text, sections empty)."""
        try:
            msg = rationale_to_msg(rationale, header=header, step=committed.step_index, rid=committed.rationale_id,
                                   fresh=fresh, text=text)
            self.pubs["rationale"].publish(String(data=msg.text))
            self.pubs["rationale_structured"].publish(msg)
        except Exception as e:
            return (f"the rationale could not be published ({type(e).__name__}: {e}); the action is published "
                    "without it")
        return ""

    def attention(self, policy: Any, rgb: np.ndarray, header: Header) -> str:
        """The attention overlay of `rgb` (when publishing it is on); returns a warning or ""."""
        if "attention" not in self.pubs:
            return ""
        try:
            self.pubs["attention"].publish(rgb_to_image(np.asarray(policy.attention_overlay(rgb)), header))
        except Exception as e:
            return f"attention overlay failed: {type(e).__name__}: {e}"
        return ""

    def wait_for_acks(self, seconds: float) -> None:
        for pub in self.pubs.values():
            pub.wait_for_all_acked(rclpy.duration.Duration(seconds=seconds))

    def destroy(self) -> None:
        for pub in self.pubs.values():
            self.node.destroy_publisher(pub)
        self.pubs = {}


def diagnostics_message(name: str, hardware_id: str, camera_stale: bool, values: dict[str, Any], header: Header
                        ) -> DiagnosticArray:
    """The node's DiagnosticStatus: WARN when not controlling (lifecycle state, disabled, no recent camera image);
    `values` as strings (floats with 2 decimals)."""
    if values["state"] != "active":
        level, message = DiagnosticStatus.WARN, f"{values['state']}: no control"
    elif not values["enabled"]:
        level, message = DiagnosticStatus.WARN, "disabled by ~/stop or ~/enable"
    elif camera_stale:
        level, message = DiagnosticStatus.WARN, "holding still: no recent camera image"
    else:
        level, message = DiagnosticStatus.OK, "running"
    status = DiagnosticStatus(name=name, hardware_id=hardware_id, level=level, message=message)
    status.values = [KeyValue(key=k, value=f"{v:.2f}" if isinstance(v, float) else str(v)) for k, v in values.items()]
    return DiagnosticArray(header=header, status=[status])
