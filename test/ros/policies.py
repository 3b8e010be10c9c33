"""Honest stand-in policies for ROS tests: small classes with the real Policy's API (predict / reset -> PolicyOutput).

The policy node loads them through its `policy_factory` parameter ("test.ros.policies:<callable>"), exactly as it
would load a user's own policy; they exist so the node's safety behaviour can be tested without a trained model
(the real `Policy.from_checkpoint` path is exercised where a checkpoint can be built). Each one is deterministic and
encodes what it saw into its output so tests can check which image and instruction reached the model.

Optional file markers (env REFINEVLA_TEST_POLICY_MARKERS=<dir>): `predict-start-<n>` / `predict-end-<n>` files let a
test observe, without timing, that an inference is in flight.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from refinevla_core.inference.types import PolicyOutput
from refinevla_core.rationale import Rationale

# dx, dy, dz, droll, dpitch, dyaw, gripper: x and yaw are beyond the default clip (0.05 m, 0.25 rad)
CONSTANT_ACTION = np.array([0.2, -0.02, 0.01, 0.1, 0.0, -0.6, 0.0], dtype=np.float32)


class _Base:
    def __init__(self) -> None:
        self.resets = 0
        self.calls = 0
        self.calls_this_episode = 0
        marker_dir = os.environ.get("REFINEVLA_TEST_POLICY_MARKERS")
        self.marker_dir = Path(marker_dir) if marker_dir else None

    def reset(self) -> None:
        self.resets += 1
        self.calls_this_episode = 0

    def _mark(self, what: str) -> None:
        if self.marker_dir is not None:
            (self.marker_dir / f"{what}-{self.calls}").write_text("")

    def _rationale(self, image: np.ndarray, instruction: str) -> Rationale:
        mean = image.reshape(-1, 3).mean(axis=0)
        return Rationale(
            observation=f"image {image.shape[1]}x{image.shape[0]} mean RGB ({mean[0]:.0f}, {mean[1]:.0f}, "
                        f"{mean[2]:.0f})",
            situation_analysis=f"instruction {instruction!r}; episode {self.resets}, step {self.calls_this_episode}",
            spatial_reasoning="stand-in policy: no spatial reasoning",
            task_planning="output a fixed test action",
        )

    def predict(self, image: np.ndarray, instruction: str) -> PolicyOutput:
        self.calls += 1
        self._mark("predict-start")
        action = self.action(image, instruction)
        out = PolicyOutput(action=action, rationale=self._rationale(image, instruction), rationale_fresh=True,
                           timings_ms={"total": 0.0})
        out.rationale_text = out.rationale.text()
        self.calls_this_episode += 1
        self._mark("predict-end")
        return out

    def action(self, image: np.ndarray, instruction: str) -> np.ndarray:
        raise NotImplementedError


class ConstantPolicy(_Base):
    """Always the same action (partly outside the clip limits)."""

    def action(self, image: np.ndarray, instruction: str) -> np.ndarray:
        return CONSTANT_ACTION.copy()


class ImageMeanPolicy(_Base):
    """dx, dy, dz = mean R, G, B / 255 * 0.04 m, so a test can tell which image the model saw; gripper open."""

    def action(self, image: np.ndarray, instruction: str) -> np.ndarray:
        mean = image.reshape(-1, 3).mean(axis=0) / 255.0 * 0.04
        return np.array([*mean, 0.0, 0.0, 0.0, 1.0], dtype=np.float32)


FAULTS = ("nan", "inf", "-inf", "huge", "nan_gripper", "short", "ok")


class FaultyPolicy(_Base):
    """Cycles through broken outputs (NaN, ±inf, 1e9, NaN gripper, 6 values) and one good one, in FAULTS order."""

    def action(self, image: np.ndarray, instruction: str) -> np.ndarray:
        fault = FAULTS[(self.calls - 1) % len(FAULTS)]
        a = np.array([0.01, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0], dtype=np.float32)
        if fault == "nan":
            a[0] = np.nan
        elif fault == "inf":
            a[2] = np.inf
        elif fault == "-inf":
            a[5] = -np.inf
        elif fault == "huge":
            a[:6] = 1e9
            a[6] = 7.0
        elif fault == "nan_gripper":
            a[6] = np.nan
        elif fault == "short":
            a = a[:6]
        return a


class RaisingPolicy(_Base):
    """Raises on every other call, as a model with a bug would."""

    def action(self, image: np.ndarray, instruction: str) -> np.ndarray:
        if self.calls % 2:
            raise RuntimeError("stand-in model failure")
        return np.array([0.01, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0], dtype=np.float32)


class SlowPolicy(ImageMeanPolicy):
    """ImageMeanPolicy that takes `REFINEVLA_TEST_POLICY_SECONDS` (default 1.0) per prediction."""

    def action(self, image: np.ndarray, instruction: str) -> np.ndarray:
        time.sleep(float(os.environ.get("REFINEVLA_TEST_POLICY_SECONDS", "1.0")))
        return super().action(image, instruction)


class AttentionPolicy(ConstantPolicy):
    """ConstantPolicy with the optional attention hook: an overlay that is the input image with red boosted."""

    def attention_overlay(self, image: np.ndarray) -> np.ndarray:
        out = image.copy()
        out[:, :, 0] = 255
        return out


class CutOffRationale:
    """Duck-typed sections of a generation cut off after two headings (as refinevla_core.demo.node_policy returns)."""

    def __init__(self, text: str) -> None:
        self.observation, self.situation_analysis = "red cube", "the gripper is"
        self.spatial_reasoning = self.task_planning = ""
        self._text = text

    def text(self) -> str:
        return self._text


class UnparsedRationalePolicy(ConstantPolicy):
    """Rationales that do not parse into four sections: raw text only, then duck-typed sections, then a valid one."""

    def predict(self, image: np.ndarray, instruction: str) -> PolicyOutput:
        out = super().predict(image, instruction)
        kind = self.calls % 3
        cut = "Observation: red cube\nSituation Analysis: the gripper is"
        if kind == 1:
            out.rationale, out.rationale_text = None, cut
        elif kind == 2:
            out.rationale, out.rationale_text = CutOffRationale(cut), cut
        return out


def unparsed_rationale_policy() -> UnparsedRationalePolicy:
    return UnparsedRationalePolicy()


def constant_policy() -> ConstantPolicy:
    return ConstantPolicy()


def image_mean_policy() -> ImageMeanPolicy:
    return ImageMeanPolicy()


def faulty_policy() -> FaultyPolicy:
    return FaultyPolicy()


def raising_policy() -> RaisingPolicy:
    return RaisingPolicy()


def slow_policy() -> SlowPolicy:
    return SlowPolicy()


def attention_policy() -> AttentionPolicy:
    return AttentionPolicy()


def not_a_policy() -> object:
    """Lacks predict/reset: the node must refuse it with a clear error."""
    return object()
