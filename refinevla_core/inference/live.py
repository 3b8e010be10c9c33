"""Streaming and async rationale modes: rationales written beside control, never inside it (one live stream).

- streaming (action-first models, target order action_then_rationale): on a due step the action_then_rationale
  generation starts on a background thread; `predict` returns as soon as its 7 action tokens are decoded, with
  `rationale_pending` (a Future) that resolves to the rationale when it is finished. Steps in between are
  action-only. The next step's action never waits for the rationale: the background decoding yields the model to
  it between tokens (ModelGate).
- async (rationale-first models; also works with action-first ones): every step decodes the action with the cached
  rationale fed as the prefix (as every_n does); a background worker writes a fresh rationale on the latest image
  and it is swapped in at the next step (rationale_fresh=True there). The first step of an episode writes its
  rationale inside the step (the action must be conditioned on one). A new instruction or reset() drops the cache and
  stops the worker's generation at once.

`rationale_every_n` paces both: a new rationale starts at most every n steps, and only when the last one finished.
Outputs carry the rationale's age (steps and seconds since the image it was written on).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from refinevla_core.inference.background import GenerationCancelledError, ModelGate, TokenStreamer
from refinevla_core.inference.types import LateRationale, PolicyOutput
from refinevla_core.rationale import Rationale, RationaleError, parse_rationale

if TYPE_CHECKING:
    from refinevla_core.inference.policy import Policy

ACTION_TOKENS = 7
READY_TIMEOUT_S = 600.0  # a background generation that gives no action tokens for this long is a bug, not a wait


@dataclass
class _Step:
    """The step a generation belongs to: its image, instruction, index and monotonic time."""

    image: np.ndarray
    instruction: str
    index: int
    at: float


@dataclass
class CachedRationale:
    instruction: str
    ids: list[int]
    text: str
    rationale: Rationale | None  # None when the text does not parse into four sections (kept anyway)
    step: int = 0  # the policy step whose image it was written on
    written_at: float = 0.0  # monotonic time of that step
    complete: bool = True

    @classmethod
    def decode(cls, processor: Any, ids: list[int], instruction: str, *, step: int, written_at: float,
               complete: bool = True) -> CachedRationale:
        text = processor.decode_text(ids)
        try:
            parsed = parse_rationale(text)
        except RationaleError:
            parsed = None
        return cls(instruction, list(ids), text, parsed, step, written_at, complete)

    def age(self, step: int, now: float) -> tuple[int, float]:
        return step - self.step, now - self.written_at


class LiveRationales:
    """The streaming / async machinery of one Policy (row 0 of its stream)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.gate = ModelGate()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="refinevla-rationale")
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._in_flight: Future | None = None
        self._latest: CachedRationale | None = None  # the rationale in use
        self._ready: CachedRationale | None = None  # async: a finished refresh, swapped in at the next step
        self._last_start = -(10**9)

    @property
    def latest(self) -> CachedRationale | None:
        """The rationale in use (fed to the next action in rationale_then_action order)."""
        with self._lock:
            return self._latest

    def reset(self) -> None:
        """A new episode: stop any background generation at its next token and forget every rationale."""
        with self._lock:
            self._cancel.set()
            self._cancel = threading.Event()
            self._latest = self._ready = None
            self._in_flight = None
            self._last_start = -(10**9)

    def close(self) -> None:
        self.reset()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait for the background generation in flight, if any (tests, benchmarks); True when none is left."""
        future = self._in_flight
        if future is None:
            return True
        try:
            future.result(timeout_s)
        except TimeoutError:
            return False
        except BaseException:  # its error belongs to the step that started it
            return True
        return True

    def predict(self, image: np.ndarray, instruction: str, step: int) -> PolicyOutput:
        with self._lock:
            if self._latest is not None and self._latest.instruction != instruction:
                self._latest = self._ready = None  # a new instruction invalidates the cache at once
        now = _Step(image, instruction, step, time.monotonic())
        return self._streaming(now) if self.policy.config.rationale_mode == "streaming" else self._async(now)

    # ---- streaming --------------------------------------------------------------------------------------------

    def _due(self, step: int) -> bool:
        idle = self._in_flight is None or self._in_flight.done()
        return idle and step - self._last_start >= self.policy.config.rationale_every_n

    def _streaming(self, now: _Step) -> PolicyOutput:
        t0 = time.perf_counter()
        if not self._due(now.index):
            with self.gate.control():
                g = self.policy.generate_one(now.image, now.instruction, "action")
            return self._output(self.policy.action_of(g.action_bins), None, fresh=False, now=now, t0=t0)
        ready, box = threading.Event(), {}

        def on_tokens(tokens: list[int]) -> None:
            if len(tokens) >= ACTION_TOKENS and not ready.is_set():
                box["ids"], box["at"] = tokens[:ACTION_TOKENS], time.perf_counter()
                ready.set()

        pending: Future = Future()
        self._start(now, on_tokens=on_tokens, pending=pending, ready=ready, box=box)
        if not ready.wait(READY_TIMEOUT_S) or "ids" not in box:
            raise box.get("error") or RuntimeError("the background generation gave no action tokens")
        out = self._output(self.policy.action_of_ids(box["ids"]), None, fresh=False, now=now, t0=t0)
        out.rationale_pending, out.rationale_age_steps, out.rationale_age_s = pending, 0, 0.0
        out.timings_ms["action"] = (box["at"] - t0) * 1e3
        return out

    # ---- async --------------------------------------------------------------------------------------------------

    def _async(self, now: _Step) -> PolicyOutput:
        t0 = time.perf_counter()
        fresh = False
        with self._lock:
            if self._ready is not None and self._ready.instruction == now.instruction:
                self._latest, self._ready, fresh = self._ready, None, True
            latest = self._latest
        order = self.policy.target_order
        if latest is None:  # the first step of an episode: its action is conditioned on a rationale written now
            with self.gate.control():
                g = self.policy.generate_one(now.image, now.instruction, order)
            latest = self._cached(g, now)
            with self._lock:
                self._latest, self._last_start = latest, now.index
            return self._output(self.policy.action_of(g.action_bins), latest, fresh=True, now=now, t0=t0)
        with self.gate.control():
            fed = [latest.ids] if order == "rationale_then_action" else None
            g = self.policy.generate_one(now.image, now.instruction, "action", fed=fed)
        out = self._output(self.policy.action_of(g.action_bins), latest, fresh=fresh, now=now, t0=t0)
        if self._due(now.index):
            self._start(now)
        return out

    # ---- background ---------------------------------------------------------------------------------------------

    def _cached(self, g: Any, step: _Step) -> CachedRationale:
        return CachedRationale.decode(self.policy.model.processor, g.rationale_ids, step.instruction, step=step.index,
                                      written_at=step.at, complete=g.rationale_complete)

    def _start(self, step: _Step, *, on_tokens: Any = None, pending: Future | None = None,
               ready: threading.Event | None = None, box: dict[str, Any] | None = None) -> None:
        """Write a rationale on `step`'s image in the background; streaming resolves `pending`, async fills the
        cache for the next step."""
        cancel, policy, box = self._cancel, self.policy, box if box is not None else {}

        def job() -> None:
            t0 = time.perf_counter()
            try:
                with self.gate.background():
                    g = policy.generate_one(step.image, step.instruction, policy.target_order,
                                            streamer=TokenStreamer(self.gate, cancel, on_tokens))
                cached = self._cached(g, step)
                with self._lock:
                    if cancel.is_set():
                        raise GenerationCancelledError
                    if pending is not None:
                        self._latest = cached
                    else:
                        self._ready = cached
                if pending is not None:
                    pending.set_result(LateRationale(cached.text, cached.rationale, cached.complete,
                                                     (time.perf_counter() - t0) * 1e3))
            except BaseException as e:  # reported through the Future / to the step waiting for the action
                box.setdefault("error", e)
                if ready is not None:
                    ready.set()
                if pending is not None and not pending.done():
                    pending.set_exception(e)

        with self._lock:
            self._last_start = step.index
            self._in_flight = self._executor.submit(job)

    def _output(self, action: np.ndarray, cached: CachedRationale | None, *, fresh: bool, now: _Step, t0: float
                ) -> PolicyOutput:
        total = (time.perf_counter() - t0) * 1e3
        out = PolicyOutput(action=action, rationale=cached.rationale if cached else None,
                           rationale_text=cached.text if cached else "", rationale_fresh=fresh and cached is not None,
                           timings_ms={"action": total, "total": total})
        latest = cached or self._latest
        if latest is not None:
            out.rationale_age_steps, out.rationale_age_s = latest.age(now.index, now.at)
        return out
