"""Pi0Policy: a π0 checkpoint behind the same `predict(image, instruction)` / `reset()` API as Policy.

π0 predicts a chunk of `chunk_size` future actions per forward pass. The policy executes the chunk one action per
call (at the caller's control rate: the policy node's timer or the simulator's lock-step) and re-plans every
`replan_every` calls (the constructor's argument, else PolicyConfig.execute_steps - the policy node's parameter
policy.execute_steps - else the checkpoint's execute_steps), and also whenever the instruction changes, after
reset(), or when a fresh rationale is due (rationale modes as for Policy: action_only, every_step, every_n; with
rationale_then_action a cached rationale is fed before the expert runs, so in-between chunks stay conditioned on
it). The node's guards (stale images, holds, safety clamps) apply to each returned action
exactly as for the PaliGemma family: the policy only decides which action comes next.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from refinevla_core.config import ConfigError
from refinevla_core.inference.config import PolicyConfig
from refinevla_core.inference.policy_base import (
    CheckpointPolicy,
    finite_action,
    loading_config,
    parse_generated_rationale,
)
from refinevla_core.inference.types import PolicyOutput
from refinevla_core.model.pi0.modeling_pi0 import RefineVLAPi0

SUPPORTED_MODES = ("action_only", "every_step", "every_n")


@dataclass
class _RowState:
    instruction: str
    chunk: np.ndarray  # (chunk_size, 7) un-normalised actions
    executed: int = 0
    rationale_ids: list[int] | None = None
    rationale_text: str = ""
    rationale: Any = None
    rationale_step: int = -1  # policy step the rationale was written at


class Pi0Policy(CheckpointPolicy):
    """A loaded RefineVLAPi0 with chunked execution and rationale caching."""

    def __init__(self, model: Any, config: PolicyConfig | None = None, replan_every: int | None = None) -> None:
        config = config or PolicyConfig()
        if config.rationale_mode not in SUPPORTED_MODES:
            raise ConfigError(f"rationale_mode {config.rationale_mode!r} is not available for π0 checkpoints; "
                              f"use one of {list(SUPPORTED_MODES)}")
        super().__init__(model, config, what="the π0 model")
        chunk = model.refinevla_config.chunk_size
        self.replan_every = int(replan_every or self.config.execute_steps or model.refinevla_config.replan_every)
        if not 1 <= self.replan_every <= chunk:
            raise ConfigError(f"replan_every must be in 1..chunk_size={chunk}, got {self.replan_every}")
        self.rows: dict[int, _RowState] = {}  # row i = environment i: its chunk, position and rationale
        self.plans = 0  # chunks sampled since construction (what re-planning costs)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu", config: PolicyConfig | None = None,
                        replan_every: int | None = None) -> Pi0Policy:
        config = loading_config(config)
        return cls(cls.load_model(path, device, config), config, replan_every)

    @staticmethod
    def load_model(path: str | Path, device: str, config: PolicyConfig) -> Any:
        """A π0 checkpoint's RefineVLAPi0 (a PaliGemma-family folder is refused by its missing π0 config)."""
        return RefineVLAPi0.from_pretrained(path, device=device, dtype=config.dtype or None, verify=config.verify)

    def reset(self) -> None:
        """A new episode: drop the chunks and rationales in flight."""
        self.rows.clear()
        self._step = 0

    def predict(self, image: np.ndarray, instruction: str) -> PolicyOutput:
        return self.predict_batch([image], [instruction])[0]

    def _rationale_due(self, row: _RowState | None, instruction: str) -> bool:
        mode = self.config.rationale_mode
        if mode == "action_only":
            return False
        if mode == "every_step" or row is None or row.instruction != instruction or row.rationale_ids is None:
            return True
        return self._step - row.rationale_step >= self.config.rationale_every_n

    def _plan_due(self, row: _RowState | None, instruction: str) -> bool:
        return row is None or row.instruction != instruction or row.executed >= self.replan_every

    def predict_batch(self, images: Sequence[np.ndarray], instructions: Sequence[str]) -> list[PolicyOutput]:
        """One action per row (row i = environment i); rows needing a new chunk are sampled together."""
        t0 = time.perf_counter()
        images, instructions = list(images), list(instructions)
        if len(images) != len(instructions):
            raise ValueError(f"{len(images)} images but {len(instructions)} instructions; give one per image")
        order = self.target_order
        groups: dict[str, list[int]] = {}
        for i, ins in enumerate(instructions):
            row = self.rows.get(i)
            due = self._rationale_due(row, ins)
            if due or self._plan_due(row, ins):
                groups.setdefault(order if due else "action", []).append(i)
        timings: dict[int, dict[str, float]] = {}
        for plan, rows in groups.items():
            self._plan(plan, rows, images, instructions, timings)
        outputs = []
        for i in range(len(instructions)):
            row = self.rows[i]
            action = finite_action(row.chunk[row.executed])
            fresh = row.rationale_step == self._step
            keep = self.config.rationale_mode != "action_only" and row.rationale_ids is not None
            tm = {**timings.get(i, {}), "chunk_index": float(row.executed)}
            outputs.append(PolicyOutput(action=action, rationale=row.rationale if keep else None,
                                        rationale_text=row.rationale_text if keep else "", rationale_fresh=fresh,
                                        timings_ms=tm))
            row.executed += 1
        total = (time.perf_counter() - t0) * 1e3
        for out in outputs:
            out.timings_ms["total"] = total
        self._step += 1
        return outputs

    def _plan(self, plan: str, rows: list[int], images: list[np.ndarray], instructions: list[str],
              timings: dict[int, dict[str, float]]) -> None:
        fed = None
        if plan == "action" and self.target_order == "rationale_then_action" and \
                self.config.rationale_mode != "action_only":
            fed = [self.rows[i].rationale_ids or [] if i in self.rows and
                   self.rows[i].instruction == instructions[i] else [] for i in rows]
        generated = self.model.generate(
            [images[i] for i in rows], [instructions[i] for i in rows], plan=plan, fed_rationales=fed,
            max_rationale_tokens=self.config.max_rationale_tokens or None,
            seed=self.config.seed * 1_000_003 + self._step)
        self.plans += 1
        for i, g in zip(rows, generated, strict=True):
            old = self.rows.get(i)
            state = _RowState(instructions[i], self.model.processor.decode_actions(g.chunk))
            if plan != "action":
                text = self.model.processor.decode_text(g.rationale_ids)
                state.rationale_ids, state.rationale_text = list(g.rationale_ids), text
                state.rationale, state.rationale_step = parse_generated_rationale(text), self._step
            elif old is not None and old.instruction == instructions[i]:
                state.rationale_ids, state.rationale_text = old.rationale_ids, old.rationale_text
                state.rationale, state.rationale_step = old.rationale, old.rationale_step
            self.rows[i] = state
            timings[i] = {"preprocess": g.preprocess_s * 1e3, "generate": g.generate_s * 1e3,
                          "action": g.action_ready_s * 1e3}
