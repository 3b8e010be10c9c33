"""Sharing one model between the control step and background rationale decoding (streaming and async modes).

Why: a rationale costs several action-only steps; decoding it inside the control step stalls the arm. Decoding it on
a background thread is only useful if the control step never waits for it, so the two share the model through a
`ModelGate` that gives the control step priority: background decoding checks the gate after every token (through
transformers' streamer hook, with the KV cache kept) and pauses while a control step runs. The control step waits at
most for the token in progress (the background's prompt prefill, one forward pass, cannot be interrupted).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class GenerationCancelledError(Exception):
    """Raised inside a background generate to stop it (a new episode: its rationale is no longer wanted)."""


class ModelGate:
    """A lock with priority for the control step: `control()` waits only for the background's current token."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy = False
        self._control_waiting = 0
        self._background_waiting = 0
        self._background_turn = False  # a control step just ended while the background waited: one token first

    def control(self) -> _Hold:
        return _Hold(self, control=True)

    def background(self) -> _Hold:
        return _Hold(self, control=False)

    def acquire(self, control: bool) -> None:
        with self._cond:
            if control:
                self._control_waiting += 1
                self._cond.wait_for(lambda: not self._busy and not self._background_turn)
                self._control_waiting -= 1
            else:
                self._wait_as_background()
            self._busy = True

    def release(self, control: bool = False) -> None:
        with self._cond:
            self._busy = False
            self._background_turn = control and self._background_waiting > 0
            self._cond.notify_all()

    def _wait_as_background(self) -> None:
        self._background_waiting += 1
        self._cond.wait_for(lambda: not self._busy and (self._control_waiting == 0 or self._background_turn))
        self._background_waiting -= 1
        self._background_turn = False

    def yield_to_control(self) -> None:
        """Called by the background holder between tokens: step aside while a control step wants the model."""
        with self._cond:
            if self._control_waiting == 0:
                return
            self._busy = False
            self._cond.notify_all()
            self._wait_as_background()
            self._busy = True


class _Hold:
    def __init__(self, gate: ModelGate, control: bool) -> None:
        self.gate, self.control = gate, control

    def __enter__(self) -> ModelGate:
        self.gate.acquire(self.control)
        return self.gate

    def __exit__(self, *exc: Any) -> None:
        self.gate.release(self.control)


class TokenStreamer:
    """transformers streamer (put / end) for one-row background generation: collects the new tokens, reports them
    to `on_tokens`, yields the model to control steps between tokens and stops the generation when cancelled."""

    def __init__(self, gate: ModelGate, cancel: threading.Event,
                 on_tokens: Callable[[list[int]], None] | None = None) -> None:
        self.gate, self.cancel, self.on_tokens = gate, cancel, on_tokens
        self.tokens: list[int] = []
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate hands over the prompt first
            self._prompt_seen = True
            return
        self.tokens.extend(int(t) for t in value.reshape(-1).tolist())
        if self.on_tokens is not None:
            self.on_tokens(self.tokens)
        if self.cancel.is_set():
            raise GenerationCancelledError
        self.gate.yield_to_control()
        if self.cancel.is_set():
            raise GenerationCancelledError

    def end(self) -> None:
        """Nothing to flush: the caller reads the result of generate."""
