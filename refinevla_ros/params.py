"""ROS parameters that mirror a core dataclass config: same names, same defaults, same validation.

A node declares every field of its config dataclass as a parameter (nested dataclasses become dotted names), so
`config/*.yaml`, `--ros-args -p key:=value` and the Python API all speak one vocabulary.

Unknown parameters are an error, not silently ignored (a misspelt safety limit would otherwise run with the
default): nodes pass `DECLARE_OVERRIDES` to `Node.__init__`, so rclpy declares every override it was given (params
file or `-p`); `declare_config` re-declares the known ones with their types and raises ConfigError naming each
unknown key and the closest valid name. rclpy (Jazzy) has no public accessor for the overrides; this uses only
public API.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, TypeVar

from rclpy.node import Node
from rclpy.parameter import Parameter

from refinevla_core.config import ConfigError, from_dict

T = TypeVar("T")
DECLARE_OVERRIDES: dict[str, Any] = {"automatically_declare_parameters_from_overrides": True}
# parameters every rclpy node has (or ROS tooling sets), never "unknown"
ROS_PARAMETERS = ("use_sim_time", "start_type_description_service")
ROS_PARAMETER_PREFIXES = ("qos_overrides.",)


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
    """Declare `cls`'s fields as parameters (defaults from the dataclass) and return the validated config.
    ConfigError when the node was given a parameter that is not one of them (see DECLARE_OVERRIDES)."""
    fields = _flat_defaults(cls)
    given = set(node.list_parameters([], 0).names)  # overrides declared by DECLARE_OVERRIDES, and rclpy's own
    for name, default in fields.items():
        if node.has_parameter(name):  # declared from an override with the override's type: declare with ours
            node.undeclare_parameter(name)
        node.declare_parameter(name, default)
    check_unknown(node.get_name(), given - set(fields), list(fields))
    return read_config(node, cls)


def check_unknown(node_name: str, names: set[str], valid: list[str]) -> None:
    """ConfigError naming every unknown parameter and the closest valid name (difflib)."""
    unknown = sorted(n for n in names if n not in ROS_PARAMETERS and not n.startswith(ROS_PARAMETER_PREFIXES))
    if not unknown:
        return
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
        parts.append(f"{name!r}" + (f" (did you mean {close[0]}?)" if close else ""))
    raise ConfigError(f"{node_name}: unknown parameter(s) {', '.join(parts)}; a misspelt parameter would silently "
                      f"keep its default. Valid parameters: {', '.join(valid)}")


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
