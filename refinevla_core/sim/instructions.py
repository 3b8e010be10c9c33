"""Language instructions for simulated tasks: ManiSkill's tabletop tasks have none, so we supply them.

Each task has a canonical instruction (what evaluation tables print) and templated variants (verb x object phrase x
goal phrase), drawn reproducibly from the episode seed so a dataset does not teach a policy one fixed string and the
same seed always gives the same words. The object words match what the camera shows (PushCube's cube is blue).
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class InstructionTemplates:
    canonical: str
    templates: tuple[str, ...]  # with {verb}, {obj}, {goal} fields
    verbs: tuple[str, ...]
    objects: tuple[str, ...]
    goals: tuple[str, ...] = ("",)

    def variants(self) -> list[str]:
        """Every distinct phrasing, canonical first."""
        out = [self.canonical]
        for t in self.templates:
            for v in self.verbs:
                for o in self.objects:
                    for g in self.goals:
                        text = t.format(verb=v, obj=o, goal=g)
                        if text not in out:
                            out.append(text)
        return out


TEMPLATES: dict[str, InstructionTemplates] = {
    "PushCube-v1": InstructionTemplates(
        canonical="push the blue cube to the red target",
        templates=("{verb} the {obj} to the {goal}", "{verb} the {obj} onto the {goal}",
                   "{verb} the {obj} forward until it reaches the {goal}"),
        verbs=("push", "slide", "shove"),
        objects=("blue cube", "cube", "blue block"),
        goals=("red target", "red and white target", "target disc"),
    ),
    "PickCube-v1": InstructionTemplates(
        canonical="pick up the red cube and move it to the green goal",
        templates=("{verb} the {obj} and move it to the {goal}", "{verb} the {obj} and bring it to the {goal}",
                   "{verb} the {obj}, then hold it at the {goal}"),
        verbs=("pick up", "grasp", "lift", "grab"),
        objects=("red cube", "red block", "cube"),
        goals=("green goal", "green sphere", "green marker"),
    ),
    "StackCube-v1": InstructionTemplates(
        canonical="stack the red cube on the green cube",
        templates=("{verb} the {obj} on the {goal}", "{verb} the {obj} on top of the {goal}"),
        verbs=("stack", "put", "place"),
        objects=("red cube", "red block"),
        goals=("green cube", "green block"),
    ),
}


def supported_tasks() -> list[str]:
    return sorted(TEMPLATES)


def instruction_for(task: str, seed: int | None = None, mode: str = "varied") -> str:
    """The instruction of an episode: canonical, or a variant drawn from `seed` (the same seed, the same words)."""
    if task not in TEMPLATES:
        raise KeyError(f"no instruction templates for task {task!r}; known: {supported_tasks()}")
    spec = TEMPLATES[task]
    if mode == "canonical" or seed is None:
        return spec.canonical
    if mode != "varied":
        raise ValueError(f"instruction mode {mode!r} is not 'varied' or 'canonical'")
    # a private generator: never disturbs the global random state, stable across Python versions for ints
    return random.Random(f"{task}:{int(seed)}").choice(spec.variants())
