"""The demo's checkpoint policy as policy_node loads it (`policy_factory:=refinevla_core.demo.node_policy:from_env`).

Why not `checkpoint:=<folder>`: the demo's models write the first `max_rationale_tokens` tokens of the teacher's
four-section rationale (96 by default: the Observation and part of the Situation Analysis). Such text does not parse
into a full `Rationale`, and policy_node (as of this writing) builds `Rationale("", "", "", "")` for unparsed text,
which raises, so the step becomes an "internal error" hold stamped with the wrong image and a lockstep bridge waits
for ever. This wrapper returns the unchanged Policy output, plus — only where the text did not parse — a
`PartialRationale` holding the sections that are there (empty strings for the others) and the raw text, which
policy_node publishes as is. The action, the rationale text and the timings are the Policy's own.

Settings come from the environment variable REFINEVLA_DEMO_POLICY (JSON: checkpoint, rationale_mode,
rationale_every_n, seed, torch_threads), set by refinevla_ros.demo_eval for the policy_node process it starts.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from refinevla_core.rationale import SECTIONS

ENV_VAR = "REFINEVLA_DEMO_POLICY"
_HEADING = re.compile(r"(?m)(" + "|".join(re.escape(h) for _, h in SECTIONS) + r"):")


@dataclass(frozen=True)
class PartialRationale:
    """The sections a generated (possibly cut-off) rationale has; `text()` is the generated text itself."""

    observation: str
    situation_analysis: str
    spatial_reasoning: str
    task_planning: str
    raw: str

    def text(self) -> str:
        return self.raw

    @classmethod
    def from_text(cls, text: str) -> PartialRationale:
        by_heading = dict((h, f) for f, h in SECTIONS)
        found = {f: "" for f, _ in SECTIONS}
        matches = list(_HEADING.finditer(text))
        for i, m in enumerate(matches):
            end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
            field_name = by_heading[m.group(1)]
            if not found[field_name]:
                found[field_name] = " ".join(text[m.end():end].split())
        return cls(**found, raw=text)


class DemoNodePolicy:
    """A Policy whose unparsed rationale text is passed on as a PartialRationale (see the module docstring)."""

    def __init__(self, policy: Any) -> None:
        self.policy = policy

    def reset(self) -> None:
        self.policy.reset()

    def predict(self, image: np.ndarray, instruction: str) -> Any:
        out = self.policy.predict(image, instruction)
        if out.rationale is None and out.rationale_text:
            out.rationale = PartialRationale.from_text(out.rationale_text)
        return out


def from_env() -> DemoNodePolicy:
    """policy_node's policy_factory: the checkpoint and rationale mode named in $REFINEVLA_DEMO_POLICY."""
    from refinevla_core.inference.policy import Policy, PolicyConfig

    raw = os.environ.get(ENV_VAR)
    if not raw:
        raise RuntimeError(f"{ENV_VAR} is not set; it names the checkpoint (refinevla_ros.demo_eval sets it)")
    spec = json.loads(raw)
    config = PolicyConfig(rationale_mode=spec.get("rationale_mode", "every_n"),
                          rationale_every_n=int(spec.get("rationale_every_n", 10)), seed=int(spec.get("seed", 0)),
                          torch_threads=int(spec.get("torch_threads", 1)))
    return DemoNodePolicy(Policy.from_checkpoint(spec["checkpoint"], device=spec.get("device", "cpu"), config=config))
