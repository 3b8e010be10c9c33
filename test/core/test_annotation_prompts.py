"""What the teacher is shown: demonstrated actions in words and numbers, templates checked, prompt hashes stable."""

from __future__ import annotations

import math

import numpy as np
import pytest

from refinevla_core.annotation import prompts
from refinevla_core.annotation.config import AnnotationConfig, PromptConfig
from refinevla_core.annotation.openai_teacher import OpenAICompatTeacher
from refinevla_core.config import ConfigError


def action(dx=0.0, dy=0.0, dz=0.0, yaw_deg=0.0, gripper=1.0):
    return [dx, dy, dz, 0.0, 0.0, math.radians(yaw_deg), gripper]


def test_each_action_is_described_in_centimetres_degrees_and_gripper_words():
    text = prompts.describe_actions(np.array([action(0.012, -0.003, -0.02, yaw_deg=-1.5), action(gripper=0.0)]))
    assert text.splitlines() == [
        "t+0: 1.2 cm forward, 0.3 cm right, 2.0 cm down; yaw -1.5°; gripper open",
        "t+1: no translation; no rotation; gripper closed",
    ]
    assert "last frame" in prompts.describe_actions(np.zeros((0, 7)))


def test_motion_summary_sums_the_window_and_names_gripper_events():
    window = np.array([action(0.01), action(0.01, dz=-0.01), action(gripper=0.0), action(gripper=0.0)])
    summary = prompts.describe_motion(window)
    assert summary == ("over the next 4 steps: move 2.0 cm forward, 1.0 cm down, keep the orientation, "
                       "close the gripper at t+2")
    # relative to the gripper's current state: already closed, then opened at t+0
    assert "open the gripper at t+0" in prompts.describe_motion(np.array([action(gripper=1.0)]), gripper_now=0.0)
    assert prompts.describe_motion(np.array([action()])).endswith("keep the gripper open")


def test_user_prompt_renders_every_field():
    values = prompts.PromptValues(
        instruction="put the spoon in the cup", task="", frame=5, num_frames=11,
        future_actions=np.array([action(0.01)]), image_offsets=(0, 4),
    ).as_fields()
    assert set(values) == set(prompts.USER_FIELDS)
    text = prompts.render(AnnotationConfig().prompt.user, values)
    assert "Instruction: put the spoon in the cup" in text
    assert "Frame 5 of 10 (50% through" in text
    assert "image 2 is 4 steps later" in text
    assert "t+0: 1.0 cm forward" in text


@pytest.mark.parametrize("kwargs, match", [
    ({"user": "Do {instrucion}"}, r"unknown placeholder\(s\) \['instrucion'\]; valid: .*'instruction'"),
    ({"user": "Do {instruction"}, "broken braces"),
    ({"reask": "bad: {reason}"}, r"prompt.reask: unknown placeholder\(s\) \['reason'\]"),
])
def test_template_typos_fail_when_the_config_is_built(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        PromptConfig(**kwargs)


def test_prompt_hash_changes_with_what_is_asked_and_only_then():
    base = AnnotationConfig(teacher="openai", model="m")
    same = AnnotationConfig(teacher="openai", model="m", concurrency=2, temperature=0.0)
    other_template = AnnotationConfig(teacher="openai", model="m", prompt=PromptConfig(user="{instruction} please"))
    other_window = AnnotationConfig(teacher="openai", model="m", future_actions=3)
    h = OpenAICompatTeacher(base).prompt_hash
    assert OpenAICompatTeacher(same).prompt_hash == h
    assert OpenAICompatTeacher(other_template).prompt_hash != h
    assert OpenAICompatTeacher(other_window).prompt_hash != h


def test_png_data_url_round_trips():
    import base64
    import io

    from PIL import Image

    image = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    url = prompts.png_data_url(image)
    assert url.startswith("data:image/png;base64,")
    back = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
    np.testing.assert_array_equal(back, image)
