"""Dataclass configs loaded from YAML: one dataclass per component, the same names as the ROS parameters.

Why a loader of our own: unknown keys and wrong types must fail with a message naming the key, the file and the
valid choices, instead of being silently ignored (a typo in `lambda_rationale` would otherwise train λ_r = default).
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override does not fit its dataclass."""


# Where the preset YAML files live: the source checkout's config/, the copy shipped inside the wheel
# (setup.py copies config/*.yaml to refinevla_core/presets/), and the ROS package share (colcon / ./setup.sh).
CONFIG_DIRS = (
    Path(__file__).resolve().parents[1] / "config",
    Path(__file__).resolve().parent / "presets",
    Path(sys.prefix) / "share" / "refinevla" / "config",
)


def available_configs(prefix: str = "") -> list[str]:
    """Names of the shipped preset files starting with `prefix` (e.g. 'train_'), without '.yaml'."""
    return sorted({f.stem for d in CONFIG_DIRS if d.is_dir() for f in d.glob(f"{prefix}*.yaml")})


def find_config_file(name_or_path: str | Path, prefix: str = "") -> Path:
    """A config file given as a path, or as a preset name from any folder: `train_tiny`, `tiny` (with prefix
    'train_'), `train_tiny.yaml` or the repository-relative `config/train_tiny.yaml` all find the shipped preset."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if len(path.parts) == 1 or (len(path.parts) == 2 and path.parts[0] == "config"):
        stem = path.name.removesuffix(".yaml").removesuffix(".yml")
        for directory in CONFIG_DIRS:
            for candidate in (directory / f"{stem}.yaml", directory / f"{prefix}{stem}.yaml"):
                if candidate.is_file():
                    return candidate
    names = available_configs(prefix)
    hint = _did_you_mean(path.name.removesuffix(".yaml"), names)
    raise ConfigError(f"config file {path} does not exist{hint}; shipped presets: {', '.join(names) or 'none'}")


def _did_you_mean(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


class RawOverride(str):
    """A `key=value` string from a command line: kept verbatim for text fields, read as a YAML scalar otherwise
    (so `prompt.user=Task: {x}` stays text while `lr=1e-4` becomes a float and `use_lora=true` a bool)."""


def _is_text_type(tp: Any) -> bool:
    if tp is str:
        return True
    if typing.get_origin(tp) is typing.Literal:
        return all(isinstance(a, str) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return bool(args) and all(_is_text_type(a) for a in args)
    return False


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """`value` checked and converted to the annotation `tp`; dispatches on the annotation's kind."""
    if isinstance(value, RawOverride):
        value = _parse_override(value, tp, where)
    if tp is Any:
        return value
    coercer = _COERCERS_BY_ORIGIN.get(typing.get_origin(tp))
    if coercer is None and dataclasses.is_dataclass(tp) and isinstance(tp, type):
        coercer = _coerce_dataclass
    if coercer is None:
        coercer = _COERCERS_BY_TYPE.get(tp)
    return coercer(value, tp, where) if coercer is not None else value


def _parse_override(value: RawOverride, tp: Any, where: str) -> Any:
    """A command-line value: verbatim for text fields, a YAML scalar otherwise."""
    if _is_text_type(tp):
        return str(value)
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: {value!r} is not a valid value ({e})") from None


def _coerce_union(value: Any, tp: Any, where: str) -> Any:
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, where)
        except ConfigError:
            continue
    raise ConfigError(f"{where}: {value!r} fits none of {tp}")


def _coerce_literal(value: Any, tp: Any, where: str) -> Any:
    args = typing.get_args(tp)
    if value not in args:
        raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
    return value


def _coerce_dataclass(value: Any, tp: type, where: str) -> Any:
    if isinstance(value, tp):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
    return from_dict(tp, value, where=where)


def _coerce_sequence(value: Any, tp: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    item = args[0] if args else Any
    out = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    return tuple(out) if origin is tuple else out


def _coerce_mapping(value: Any, tp: Any, where: str) -> Any:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return dict(value)


def _coerce_bool(value: Any, tp: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ConfigError(f"{where}: expected true/false, got {value!r}")


def _coerce_float(value: Any, tp: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"{where}: expected a number, got {value!r}") from None


def _coerce_int(value: Any, tp: Any, where: str) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected an integer, got {value!r}") from None


def _coerce_str(value: Any, tp: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _coerce_path(value: Any, tp: Any, where: str) -> Path:
    return Path(value)


_COERCERS_BY_ORIGIN = {
    typing.Union: _coerce_union,
    types.UnionType: _coerce_union,
    typing.Literal: _coerce_literal,
    list: _coerce_sequence,
    tuple: _coerce_sequence,
    dict: _coerce_mapping,
}
_COERCERS_BY_TYPE = {bool: _coerce_bool, float: _coerce_float, int: _coerce_int, str: _coerce_str, Path: _coerce_path}


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build `cls` from a mapping; unknown keys and wrong types raise ConfigError naming the key."""
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        hint = _did_you_mean(unknown[0], types_) if len(unknown) == 1 else ""
        raise ConfigError(
            f"{where or cls.__name__}: unknown key(s) {unknown}{hint}; valid keys for {cls.__name__}: {sorted(types_)}"
        )
    kwargs = {k: _coerce(v, types_[k], f"{where + '.' if where else ''}{k}") for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from e
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain-YAML/JSON dict of a config dataclass (tuples become lists, Paths strings)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(obj)


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass a field holds (also through `X | None`), else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = inner[0] if len(inner) == 1 else None
    return tp if dataclasses.is_dataclass(tp) and isinstance(tp, type) else None


def check_overrides(cls: type, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Command-line overrides with every key resolved against `cls` and every value coerced to its field's type.

    Checked on their own, before they are merged into a YAML file's data, so a typo is blamed on the command line
    ("command line: unknown key max_step (did you mean max_steps?)") and not on the file it was applied to.
    """
    out: dict[str, Any] = {}
    for dotted, value in (overrides or {}).items():
        tp: Any = cls
        parts = dotted.split(".")
        for i, part in enumerate(parts):
            owner = _dataclass_in(tp)
            if owner is None:
                if typing.get_origin(tp) is dict or tp is Any:  # free-form mappings take any sub-key
                    tp = Any
                    break
                raise ConfigError(f"command line: {dotted}: {'.'.join(parts[:i])} is not a section with sub-keys")
            fields = _field_types(owner)
            if part not in fields:
                raise ConfigError(f"command line: unknown key {'.'.join(parts[: i + 1])}"
                                  f"{_did_you_mean(part, fields)}; valid keys here: {sorted(fields)}")
            tp = fields[part]
        out[dotted] = _coerce(value, tp, f"command line: {dotted}")
    return out


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """data['a']['b'] = value for dotted 'a.b', creating the mappings on the way (config overrides)."""
    *parents, leaf = dotted.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {p} is not a mapping")
    node[leaf] = value


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    section: str | None = None,
) -> T:
    """Load `cls` from a YAML file (optionally one top-level `section` of it) plus dotted-key overrides.

    Overrides from parse_overrides() are RawOverride strings: verbatim for text fields, YAML scalars otherwise.
    """
    data: dict[str, Any] = {}
    where = cls.__name__
    overrides = check_overrides(cls, overrides)
    if path is not None:
        p = find_config_file(path)
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
        if section is not None:
            if section not in loaded:
                raise ConfigError(f"config file {p} has no section {section!r}; it has {sorted(loaded)}")
            loaded = loaded[section] or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping, got {type(loaded).__name__}")
        data = loaded
        where = str(p)
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    try:
        return from_dict(cls, data, where=where)
    except ConfigError as e:
        raise ConfigError(str(e)) from None


def parse_overrides(items: list[str] | None, example: str = "max_steps=100") -> dict[str, Any]:
    """Turn CLI `key=value` strings into an overrides mapping; `example` is a valid override of the calling command,
    shown when an item has no '='."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"command line: {item!r} must look like key=value (e.g. {example})")
        k, v = item.split("=", 1)
        out[k.strip()] = RawOverride(v)
    return out


def save_config(obj: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))
