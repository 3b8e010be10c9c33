"""A stand-in policy for tests that run policy_node (policy_factory:=test.sim.standin_policy:make): a deterministic
function of the pixels and of its step count since reset(), so the same images in the same order give the same
actions whichever process runs it. It is not a learned model and is not meant to solve anything."""

from __future__ import annotations

import numpy as np

from refinevla_core.inference.types import PolicyOutput
from refinevla_core.rationale import Rationale


class ImageDrivenPolicy:
    def __init__(self) -> None:
        self.steps = 0

    def reset(self) -> None:
        self.steps = 0

    def predict(self, image: np.ndarray, instruction: str) -> PolicyOutput:
        self.steps += 1
        img = image.astype(np.int32)
        blue = (img[..., 2] > img[..., 0] + 40) & (img[..., 2] > img[..., 1] + 20)
        ys, xs = np.nonzero(blue)
        h, w = blue.shape
        cx = float(xs.mean() / w - 0.5) if xs.size else 0.0
        cy = float(ys.mean() / h - 0.5) if ys.size else 0.0
        action = np.array([0.04 * cy, -0.04 * cx, -0.01 * (self.steps % 3 - 1), 0.0, 0.0, 0.02 * cx,
                           float(self.steps % 7 < 4)], dtype=np.float32)
        rationale = Rationale(observation=f"{int(blue.sum())} blue pixels around ({cx:+.2f}, {cy:+.2f})",
                              situation_analysis=f"step {self.steps} of: {instruction}",
                              spatial_reasoning="the blue pixels are the cube",
                              task_planning="move towards them")
        return PolicyOutput(action=action, rationale=rationale, rationale_text=rationale.text(), rationale_fresh=True)


def make() -> ImageDrivenPolicy:
    return ImageDrivenPolicy()
