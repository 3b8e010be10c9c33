"""The four-section rationale: JSON and headed replies parse to one canonical text; bad replies are rejected."""

from __future__ import annotations

import json

import pytest

from refinevla_core.rationale import Rationale, RationaleError, parse_rationale

GOOD = {
    "observation": "A red cube and a green target on a wooden table; the gripper is above the cube.",
    "situation_analysis": "The cube has not been grasped yet; the task is at the approach phase.",
    "spatial_reasoning": "The gripper is 4 cm above and 1 cm left of the cube; the target is 15 cm in front.",
    "task_planning": "Move down 4 cm, close the gripper, lift, move forward 15 cm, open the gripper.",
}


def test_canonical_text_round_trips():
    r = Rationale(**GOOD)
    assert parse_rationale(r.text()) == r
    assert r.text().splitlines()[0].startswith("Observation: A red cube")
    assert [line.split(":")[0] for line in r.text().splitlines()] == [
        "Observation", "Situation Analysis", "Spatial Reasoning", "Task Planning"]


@pytest.mark.parametrize("reply", [
    json.dumps(GOOD),
    "```json\n" + json.dumps({"Observation": GOOD["observation"], "Situation Analysis": GOOD["situation_analysis"],
                              "Spatial Reasoning": GOOD["spatial_reasoning"],
                              "Task Planning": GOOD["task_planning"]}) + "\n```",
    "Sure! Here it is: " + json.dumps({"rationale": GOOD}) + " Hope this helps.",
    "\n".join(f"## {h}\n{GOOD[k]}" for k, h in [("observation", "Observation"),
              ("situation_analysis", "Situation Analysis"), ("spatial_reasoning", "Spatial Reasoning"),
              ("task_planning", "Task Planning")]),
    "\n".join(f"{i}. **{h}:** {GOOD[k]}" for i, (k, h) in enumerate([("observation", "Observation"),
              ("situation_analysis", "Situation Analysis"), ("spatial_reasoning", "Spatial Reasoning"),
              ("task_planning", "Task Planning")], 1)),
])
def test_reply_shapes_parse_to_the_same_rationale(reply):
    assert parse_rationale(reply) == Rationale(**GOOD)


def test_list_valued_plan_is_flattened():
    data = dict(GOOD, task_planning=["move down 4 cm", "close the gripper"])
    assert parse_rationale(json.dumps(data)).task_planning == "move down 4 cm close the gripper"


@pytest.mark.parametrize("reply, match", [
    ("", "empty"),
    ("I cannot help with that.", "neither a JSON object nor the headings"),
    (json.dumps(dict(GOOD, spatial_reasoning="  ")), "Spatial Reasoning"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "task_planning"}), "Task Planning"),
    ("Observation: a cube\nSituation Analysis: approaching", "Spatial Reasoning, Task Planning"),
])
def test_malformed_replies_are_rejected(reply, match):
    with pytest.raises(RationaleError, match=match):
        parse_rationale(reply)


def test_sections_must_be_text_and_bounded():
    with pytest.raises(RationaleError, match="must be text"):
        Rationale(**dict(GOOD, observation=3))
    with pytest.raises(RationaleError, match="characters"):
        Rationale(**dict(GOOD, observation="x" * 5000))
