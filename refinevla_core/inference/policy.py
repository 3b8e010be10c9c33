"""Policy: a ReFineVLA checkpoint behind one call — image + instruction in, un-normalised action + rationale out.

Why: every consumer (the ROS policy node, closed-loop evaluation, benchmarks) needs the same thing — load a
checkpoint once, then map observations to Bridge-convention actions at control rate — and must not re-implement
tokenization, statistics or rationale caching. The statistics come from the checkpoint; nothing is guessed.

Rationale modes (PolicyConfig.rationale_mode):
  - "action_only": 7 action tokens per step, nothing else (the fastest; rationale=None).
  - "every_step": a fresh rationale at every step.
  - "every_n": a fresh rationale every `rationale_every_n` steps (and whenever the instruction changes or after
    reset()); in between the cached one is returned with rationale_fresh=False. With target order
    rationale_then_action the cached rationale's tokens are fed as a forced prefix before <begin_action> (as ECoT
    does), so the action stays conditioned on it; with action_then_rationale the in-between steps are action-only
    and a due rationale is generated after the action (timings_ms["action"] shows the action was ready first).
  - "streaming" / "async": the rationale is written beside control on a background thread, never inside the
    step (refinevla_core.inference.live); one live stream (`predict`), not batches. Call close() when done.

`predict_batch` treats row i of every call as one episode stream (parallel environments); `reset()` starts new
episodes for all rows. Consumers may use any object with `predict`/`reset` instead (duck typing, e.g. test stand-ins).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refinevla_core.attention import action_attention
from refinevla_core.config import ConfigError
from refinevla_core.inference.config import PolicyConfig, RationaleMode  # noqa: F401  (re-exported)
from refinevla_core.inference.live import CachedRationale, LiveRationales
from refinevla_core.inference.policy_base import (  # noqa: F401  (parse_generated_rationale: re-exported)
    CheckpointPolicy,
    finite_action,
    loading_config,
    parse_generated_rationale,
)
from refinevla_core.inference.policy_pi0 import Pi0Policy
from refinevla_core.inference.types import PolicyOutput


class Policy(CheckpointPolicy):
    """A loaded ReFineVLA model with rationale caching. Build with `Policy.from_checkpoint(path)`."""

    def __init__(self, model: Any, config: PolicyConfig | None = None) -> None:
        super().__init__(model, config)
        self._cache: dict[int, CachedRationale] = {}
        self._last_instruction = ""
        mode = self.config.rationale_mode
        if mode == "streaming" and self.target_order != "action_then_rationale":
            raise ConfigError(f"rationale_mode streaming publishes the action before the rationale, but this model "
                              f"writes its rationale first (target order {self.target_order}); use async")
        self._live = LiveRationales(self) if mode in ("streaming", "async") else None

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu", config: PolicyConfig | None = None) -> Policy:
        config = loading_config(config)
        model = cls.load_model(path, device, config)
        if getattr(model, "family", None) == "pi0":  # action chunks: executed and re-planned by Pi0Policy
            return Pi0Policy(model, config)  # type: ignore[return-value]
        return cls(model, config)

    def reset(self) -> None:
        """A new episode: forget cached rationales, restart the step count (and the sampling seed sequence)."""
        self._cache.clear()
        self._step = 0
        if self._live is not None:
            self._live.reset()

    def close(self) -> None:
        """Stop background rationale work (streaming / async); the policy is not used afterwards."""
        if self._live is not None:
            self._live.close()

    def cached_rationale(self, row: int = 0) -> CachedRationale | None:
        """The rationale row `row` currently reuses (streaming / async: the live stream's), or None."""
        if self._live is not None:
            return self._live.latest
        return self._cache.get(row)

    def wait_background(self, timeout_s: float = 60.0) -> bool:
        """streaming / async: wait until no rationale is being written in the background (tests, benchmarks)."""
        return self._live is None or self._live.wait_idle(timeout_s)

    def predict(self, image: np.ndarray, instruction: str) -> PolicyOutput:
        self._last_instruction = instruction
        if self._live is None:
            return self.predict_batch([image], [instruction])[0]
        out = self._live.predict(image, instruction, self._step)
        self._step += 1
        return out

    def generate_one(self, image: np.ndarray, instruction: str, plan: str, fed: list[list[int]] | None = None,
                     streamer: Any = None) -> Any:
        """One row of model.generate with this policy's decoding settings (streaming / async building block)."""
        return self.model.generate([image], [instruction], plan=plan, fed_rationales=fed,
                                   max_rationale_tokens=self.config.max_rationale_tokens or None,
                                   do_sample=self.config.do_sample, temperature=self.config.temperature,
                                   streamer=streamer)[0]

    def action_of(self, bins: np.ndarray) -> np.ndarray:
        """Action bins -> the un-normalised float32[7] action; never passes on a non-finite one."""
        return finite_action(self.model.processor.decode_actions(bins))

    def action_of_ids(self, ids: Sequence[int]) -> np.ndarray:
        """7 generated action token ids -> the action (streaming reads them before generate returns)."""
        lay = self.model.processor.layout
        bins = np.asarray(ids, dtype=np.int64) - lay.action_token_start
        if len(bins) != 7 or bins.min() < 0 or bins.max() >= lay.n_action_bins:
            raise RuntimeError(f"expected 7 action tokens, got ids {list(ids)}")
        return self.action_of(bins)

    def attention_overlay(self, image: np.ndarray, instruction: str | None = None, layers: Any = "last") -> np.ndarray:
        """HxWx3 uint8: `image` with the action tokens' attention over its patches blended on top (what the policy
        node publishes on /refinevla/attention_overlay). Uses the last predicted instruction when none is given."""
        text = instruction or self._last_instruction
        if not text:
            raise ValueError("attention_overlay needs an instruction (none given and nothing predicted yet)")
        return np.asarray(action_attention(self.model, image, text, layers=layers).overlay(image))

    def _due(self, row: int, instruction: str) -> bool:
        mode = self.config.rationale_mode
        if mode == "action_only":
            return False
        if mode == "every_step":
            return True
        cached = self._cache.get(row)
        return cached is None or cached.instruction != instruction or self._step % self.config.rationale_every_n == 0

    def predict_batch(self, images: Sequence[np.ndarray], instructions: Sequence[str]) -> list[PolicyOutput]:
        """One step for each row (row i = environment i). Rows due for a fresh rationale are generated together."""
        t0, now = time.perf_counter(), time.monotonic()
        images, instructions = list(images), list(instructions)
        if self._live is not None:
            raise ConfigError(f"rationale_mode {self.config.rationale_mode} runs one live stream (predict); use "
                              "every_n with predict_batch")
        if len(images) != len(instructions):
            raise ValueError(f"{len(images)} images but {len(instructions)} instructions; give one per image")
        if not images:
            return []
        order = self.target_order
        due = [self._due(i, instructions[i]) for i in range(len(images))]
        groups: dict[str, list[int]] = {}
        for i, d in enumerate(due):
            groups.setdefault(order if d else "action", []).append(i)
        outputs: dict[int, PolicyOutput] = {}
        max_r = self.config.max_rationale_tokens or None
        for plan, rows in groups.items():
            fed = None
            if plan == "action" and order == "rationale_then_action" and self.config.rationale_mode != "action_only":
                fed = [self._cache[i].ids if i in self._cache and self._cache[i].instruction == instructions[i] else []
                       for i in rows]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.config.seed * 1_000_003 + self._step)
                generated = self.model.generate(
                    [images[i] for i in rows], [instructions[i] for i in rows], plan=plan, fed_rationales=fed,
                    max_rationale_tokens=max_r, do_sample=self.config.do_sample, temperature=self.config.temperature,
                )
            for i, g in zip(rows, generated, strict=True):
                action = self.action_of(g.action_bins)
                fresh = plan != "action"
                if fresh:
                    self._cache[i] = CachedRationale.decode(self.model.processor, g.rationale_ids, instructions[i],
                                                            step=self._step, written_at=now)
                cached = self._cache.get(i) if self.config.rationale_mode != "action_only" else None
                if cached is not None and cached.instruction != instructions[i]:
                    cached = None
                timings = {
                    "preprocess": g.preprocess_s * 1e3, "generate": g.generate_s * 1e3,
                    "action": g.action_ready_s * 1e3,
                }
                outputs[i] = PolicyOutput(
                    action=action,
                    rationale=cached.rationale if cached else None,
                    rationale_text=cached.text if cached else "",
                    rationale_fresh=fresh,
                    timings_ms=timings,
                )
                if cached is not None:
                    outputs[i].rationale_age_steps, outputs[i].rationale_age_s = cached.age(self._step, now)
        total = (time.perf_counter() - t0) * 1e3
        for out in outputs.values():
            out.timings_ms["total"] = total
        self._step += 1
        return [outputs[i] for i in range(len(images))]
