"""run_node: the one `main()` every ReFineVLA node uses — init, build, spin, SIGINT/SIGTERM, a final hook, clean
shutdown and exit codes — so the nodes agree on how they start and stop.

Why our own signal handling: rclpy's default handler shuts the context down on SIGINT, after which a node can no
longer publish; nodes that command motion must publish a final zero step on the way out, so SIGINT and SIGTERM
become KeyboardInterrupt here, the spin loop ends, and `on_exit(node)` runs while the context is still up.

Exit codes: 0 after a signal or an external shutdown; 2 for bad parameters (the message names the parameter);
other startup failures map to the codes the node passes in `fatal` (1 by default).
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import rclpy
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions

from refinevla_core.config import ConfigError

N = TypeVar("N", bound=Node)
BAD_PARAMETERS = (ConfigError, InvalidParameterTypeException, InvalidParameterValueException)
FLOAT_HINT = " (numbers declared as floats need a decimal point, e.g. 5.0)"
# (exception types, exit code, message prefix): how a failure while building the node is reported
Fatal = tuple[tuple[type[BaseException], ...], int, str]
DEFAULT_FATAL: tuple[Fatal, ...] = ((BAD_PARAMETERS, 2, "bad parameters"),)


def run_node(make_node: Callable[[], N], name: str, *, args: list[str] | None = None,
             fatal: Sequence[Fatal] = DEFAULT_FATAL, on_start: Callable[[N], None] | None = None,
             on_exit: Callable[[N], None] | None = None) -> int:
    """Build the node with `make_node()`, spin it until SIGINT/SIGTERM or an external shutdown, run `on_exit(node)`
    with the context still up (e.g. publish a final zero step), then destroy it; returns the process exit code."""
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    # SIGINT too, explicitly: Python leaves SIGINT ignored when the process started with it ignored (a background
    # job of a script, `nohup`), and the node would then not stop on Ctrl-C / kill -INT until killed
    previous = {s: signal.signal(s, signal.default_int_handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        node, code = _build(make_node, name, fatal)
        return code if node is None else _spin(node, on_start, on_exit)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        rclpy.try_shutdown()


def _build(make_node: Callable[[], N], name: str, fatal: Sequence[Fatal]) -> tuple[N | None, int]:
    """(node, 0), or (None, exit code) with the reason printed when building failed in an expected way."""
    try:
        return make_node(), 0
    except KeyboardInterrupt:
        return None, 0
    except Exception as e:
        for types, code, prefix in fatal:
            if isinstance(e, types):
                hint = FLOAT_HINT if isinstance(e, InvalidParameterTypeException) else ""
                print(f"{name}: {prefix + ': ' if prefix else ''}{e}{hint}", file=sys.stderr)
                return None, code
        raise


def _spin(node: Any, on_start: Callable[[Any], None] | None, on_exit: Callable[[Any], None] | None) -> int:
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        if on_start is not None:
            on_start(node)
        while rclpy.ok():  # wakes every 0.1 s so SIGINT/SIGTERM (KeyboardInterrupt) is handled promptly
            executor.spin_once(timeout_sec=0.1)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if on_exit is not None:
            with contextlib.suppress(Exception):
                on_exit(node)
        executor.shutdown()
        node.destroy_node()
    return 0
