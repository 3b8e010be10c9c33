"""Instructions: the same seed gives the same words, seeds vary the phrasing, canonical mode is fixed."""

from __future__ import annotations

import pytest

from refinevla_core.sim.instructions import TEMPLATES, instruction_for, supported_tasks


def test_same_seed_same_words_and_seeds_vary_the_phrasing():
    for task in supported_tasks():
        assert instruction_for(task, 7) == instruction_for(task, 7)
        phrasings = {instruction_for(task, s) for s in range(30)}
        assert len(phrasings) >= 5, (task, phrasings)
        assert phrasings <= set(TEMPLATES[task].variants())


def test_canonical_mode_and_object_words_match_the_scene():
    assert instruction_for("PushCube-v1", 3, "canonical") == "push the blue cube to the red target"
    assert {instruction_for("PushCube-v1", s, "canonical") for s in range(10)} == {TEMPLATES["PushCube-v1"].canonical}
    # PushCube's cube is blue in ManiSkill: no variant may call it red
    assert not any("red cube" in v for v in TEMPLATES["PushCube-v1"].variants())
    assert all("red" in v or "cube" in v for v in TEMPLATES["StackCube-v1"].variants())


def test_unknown_task_and_mode_are_named():
    with pytest.raises(KeyError, match="PushCube-v1"):
        instruction_for("OpenDoor-v9", 0)
    with pytest.raises(ValueError, match="canonical"):
        instruction_for("PushCube-v1", 0, "poetic")
