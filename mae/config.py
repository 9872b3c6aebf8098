"""Stage configs: dataclass defaults, then a YAML file, then ``key=value`` overrides.

Every key is checked against the dataclass before any work starts, and an error names
the bad key (dotted, as the user wrote it) or the bad value and the type expected.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .files import write_atomic

C = TypeVar("C")


class ConfigError(ValueError):
    """A config key or value the stage cannot accept."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against ``tp``; YAML already typed it, so only safe widenings happen."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, typing.get_args(tp)))}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. resume=123 given as a number
        if value is False:  # YAML 1.1 reads a bare `no` as false: mixed_precision=no
            return "no"
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {tp!r}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _merge(cls: type, base: dict[str, Any], updates: dict[str, Any], prefix: str, source: str) -> None:
    types_ = _field_types(cls)
    for key, value in updates.items():
        dotted = f"{prefix}{key}"
        if key not in types_:
            known = ", ".join(prefix + k for k in types_)
            raise ConfigError(f"unknown config key {dotted!r} in {source}; known keys: {known}")
        tp = types_[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted}: expected a mapping of {_type_name(tp)} settings in {source}, got {value!r}")
            _merge(tp, base[key], value, dotted + ".", source)
        else:
            base[key] = _coerce(value, tp, dotted)


def _build(cls: type[C], values: dict[str, Any]) -> C:
    types_ = _field_types(cls)
    kwargs = {k: _build(types_[k], v) if dataclasses.is_dataclass(types_[k]) else v for k, v in values.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err)) from err


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}``; values are read as YAML scalars."""
    out: dict[str, Any] = {}
    for arg in args:
        key, sep, raw = arg.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {arg!r} is not of the form key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {arg!r} conflicts with an earlier one for {p!r}")
        node[leaf] = value
    return out


def load_config(cls: type[C], config_file: str | Path | None = None, overrides: list[str] = ()) -> C:
    """Defaults, then the YAML file, then overrides; validated by the dataclass itself."""
    values = dataclasses.asdict(cls())
    if config_file is not None:
        path = Path(config_file)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err.strerror}") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(data).__name__}")
        _merge(cls, values, _without_stage(cls, data, f"config file {path}"), "", str(path))
    _merge(cls, values, parse_overrides(list(overrides)), "", "the command line")
    return _build(cls, values)


def config_from_mapping(cls: type[C], data: dict[str, Any], source: str) -> C:
    """A config from a saved mapping (e.g. the one a checkpoint records), checked as a file is."""
    values = dataclasses.asdict(cls())
    _merge(cls, values, _without_stage(cls, data, source), "", source)
    return _build(cls, values)


def save_config(cfg: Any, path: str | Path) -> None:
    """The resolved settings, headed by the ``stage`` that ran them (the config class's
    ``stage``), so a run folder says what made it and nothing has to guess from its keys."""
    stage = {"stage": cfg.stage} if isinstance(getattr(cfg, "stage", None), str) else {}
    write_atomic(path, yaml.safe_dump({**stage, **dataclasses.asdict(cfg)}, sort_keys=False))


def _without_stage(cls: type, data: dict[str, Any], source: str) -> dict[str, Any]:
    """A saved config's settings without its ``stage`` (not a setting: the class is the
    stage), after checking that the stage is this one, so a run's config.yaml is read back
    as a config file and another stage's is refused by name."""
    if "stage" not in data or "stage" in _field_types(cls):
        return data
    own = getattr(cls, "stage", None)
    if data["stage"] != own:
        raise ConfigError(f"{source} is a {data['stage']} run's config, not {own or cls.__name__}'s: "
                          f"give it to pipelines.{data['stage']}, or drop its stage key")  # fmt: skip
    return {k: v for k, v in data.items() if k != "stage"}


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per key with its type and default, for ``--help``."""
    lines = []
    default = cls()
    for name, tp in _field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            lines += describe(tp, prefix + name + ".")
        else:
            lines.append(f"  {prefix}{name} ({_type_name(tp)}) = {getattr(default, name)!r}")
    return lines
