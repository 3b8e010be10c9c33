"""ROS parameters that mirror a core dataclass config: same names, same defaults, same validation.

A node declares every field of its config dataclass as a parameter (nested dataclasses become dotted names), so
`config/*.yaml`, `--ros-args -p key:=value` and the Python API all speak one vocabulary.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

from rclpy.node import Node
from rclpy.parameter import Parameter

from refinevla_core.config import from_dict

T = TypeVar("T")


def _flat_defaults(cls: type, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(_flat_defaults(tp, f"{prefix}{f.name}."))
            continue
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            raise TypeError(f"{cls.__name__}.{f.name} needs a default to be a ROS parameter")
        if value is None:
            value = ""  # ROS parameters have no None; empty string means "unset"
        if isinstance(value, tuple):
            value = list(value)
        out[prefix + f.name] = value
    return out


def declare_config(node: Node, cls: type[T]) -> T:
    """Declare `cls`'s fields as parameters (defaults from the dataclass) and return the validated config."""
    for name, default in _flat_defaults(cls).items():
        node.declare_parameter(name, default)
    return read_config(node, cls)


def read_config(node: Node, cls: type[T]) -> T:
    """Current parameter values -> `cls` (ConfigError names the parameter when a value does not fit)."""
    nested: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for name in _flat_defaults(cls):
        value = node.get_parameter(name).value
        *parents, leaf = name.split(".")
        target = nested
        for p in parents:
            target = target.setdefault(p, {})
        target[leaf] = value
    # "" means None for optional fields
    for f in dataclasses.fields(cls):
        if nested.get(f.name) == "" and type(None) in typing.get_args(hints[f.name]):
            nested[f.name] = None
    return from_dict(cls, nested, where=f"{node.get_name()} parameters")


def parameter_overrides(cfg: Any) -> list[Parameter]:
    """A config dataclass -> rclpy Parameters (for tests and for launching nodes in-process)."""
    return [Parameter(k, value=v) for k, v in _flat_defaults_from_obj(cfg).items()]


def _flat_defaults_from_obj(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out.update(_flat_defaults_from_obj(v, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = "" if v is None else (list(v) if isinstance(v, tuple) else v)
    return out
