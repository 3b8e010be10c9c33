"""make_policy: the one place a policy is built from settings (the policy node, `refinevla bench ros`, eval), so
every consumer loads checkpoints and user factories the same way and reports the same errors.

A new model family adds a branch in `load_checkpoint_policy` (keyed on what the checkpoint folder says it is).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from refinevla_core.inference.config import PolicyConfig, RunnerConfig
from refinevla_core.inference.types import PolicyLike


class PolicyLoadError(RuntimeError):
    """The policy could not be loaded; the message says which setting to fix."""


def load_callable(spec: str, what: str = "policy_factory") -> Any:
    """'package.module:callable' -> the callable; PolicyLoadError naming `what` when it cannot be imported."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise PolicyLoadError(f"{what} {spec!r} must look like 'package.module:callable'")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise PolicyLoadError(f"{what} {spec!r} cannot be imported: {e}") from e


def load_checkpoint_policy(path: Path, device: str, config: PolicyConfig) -> PolicyLike:
    """A checkpoint folder -> its Policy (torch is imported only here)."""
    from refinevla_core.inference.policy import Policy

    return Policy.from_checkpoint(path, device=device, config=config)


def make_policy(config: RunnerConfig) -> PolicyLike:
    """The policy named by `config`: `policy_factory` ("pkg.module:callable") or `checkpoint` (a folder)."""
    if config.policy_factory and config.checkpoint:
        raise PolicyLoadError("set only one of the parameters checkpoint and policy_factory")
    if config.policy_factory:
        policy = load_callable(config.policy_factory)()
    elif config.checkpoint:
        path = Path(config.checkpoint).expanduser()
        if not path.exists():
            raise PolicyLoadError(f"checkpoint {path} does not exist; pass checkpoint:=<folder written by "
                                  "`refinevla train`>")
        policy = load_checkpoint_policy(path, config.device, config.policy)
    else:
        raise PolicyLoadError("no policy: set the parameter checkpoint:=<checkpoint folder> (or policy_factory:="
                              "package.module:callable for your own policy object)")
    check_policy(policy)
    return policy


def check_policy(policy: Any) -> None:
    """PolicyLoadError unless `policy` has callable predict and reset (the PolicyLike API)."""
    missing = [m for m in ("predict", "reset") if not callable(getattr(policy, m, None))]
    if missing:
        raise PolicyLoadError(f"the policy object {type(policy).__name__} has no {' / '.join(missing)} method; "
                              "it needs predict(image, instruction) -> PolicyOutput and reset()")
