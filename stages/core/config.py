"""Typed configs: YAML in, dataclasses out, unknown keys refused with a suggestion.

Every stage describes its settings as nested dataclasses whose fields carry a default and a
``help`` string in ``metadata``. ``load_config`` reads a YAML file, applies ``key.sub=value``
overrides from the command line and builds the dataclass, checking each value's type. Errors name
the file, the line and the dotted key, so a typo in a 200-line recipe is found at once.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from stages.core.config_sources import (  # noqa: F401 (re-exported: pipelines read YAML through here)
    Origins, _LineMap, apply_overrides, read_yaml, yaml_text)
from stages.core.errors import ConfigError, did_you_mean

T = TypeVar("T")


def field(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING):
    """A dataclass field with its help text beside it (shown by ``lorelay ... --help-config``)."""
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


# ----------------------------------------------------------------------------------------------
# YAML with line numbers
# ----------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------
# dict -> dataclass, with type checks
# ----------------------------------------------------------------------------------------------

def _yaml_text_of(value: Any) -> str:
    """A config value (dataclasses and paths too) as the YAML a user would write."""
    return yaml_text(to_dict(value))


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if get_origin(tp) is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


class _Builder:
    def __init__(self, origins: Origins):
        self.origins = origins

    def fail(self, key: str, message: str, hint: str | None = None) -> typing.NoReturn:
        override = self.origins.override(key) if key else None
        if override is not None:
            raise ConfigError(f"override '{override}': {message}", hint=hint)
        file, line = self.origins.locate(key)
        raise ConfigError(message, file=file, line=line, field=key or None, hint=hint)

    def build(self, cls: type[T], data: Any, prefix: str) -> T:
        if isinstance(data, cls):
            return data
        if not isinstance(data, Mapping):
            self.fail(prefix, f"expected a mapping for {cls.__name__}, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            dotted = f"{prefix}.{key}" if prefix else str(key)
            if key not in fields:
                self.fail(dotted, f"unknown key '{key}' in {cls.__name__}",
                          did_you_mean(str(key), fields) or f"valid keys: {', '.join(fields)}")
            kwargs[key] = self.convert(hints[key], value, dotted)
        missing = [name for name, f in fields.items() if name not in kwargs
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            self.fail(f"{prefix}.{missing[0]}" if prefix else missing[0], "required key is missing")
        try:
            built = cls(**kwargs)
        except (ValueError, ConfigError) as err:
            if isinstance(err, ConfigError) and (err.file or err.reason.startswith("override '")):
                raise
            reason = err.reason if isinstance(err, ConfigError) else str(err)
            key = err.field if isinstance(err, ConfigError) and err.field else prefix
            key = f"{prefix}.{key}" if prefix and key != prefix else key
            self.fail(key, reason, err.hint if isinstance(err, ConfigError) else None)
        file, line = self.origins.locate(prefix)
        if hasattr(built, "locate") and file is not None:
            # Objects that report errors later (a reward at its first call) remember their config line.
            built.locate(file, line)
        return built

    def convert(self, tp: Any, value: Any, key: str) -> Any:
        origin = get_origin(tp)
        if tp is Any:
            return value
        if origin in (Union, types.UnionType):
            options = get_args(tp)
            if value is None and type(None) in options:
                return None
            # A value whose own type is one of the options stays as it is ("all-linear" for list[str] | str).
            exact = [o for o in options if o in (str, int, float, bool) and type(value) is o]
            if exact:
                return value
            errors = []
            for option in options:
                if option is type(None):
                    continue
                try:
                    return self.convert(option, value, key)
                except ConfigError as err:
                    errors.append(err)
            self.fail(key, f"expected {_type_name(tp)}, got {value!r}")
        if origin is Literal:
            if value in get_args(tp):
                return value
            choices = [str(a) for a in get_args(tp)]
            self.fail(key, f"expected one of {', '.join(choices)}; got {value!r}",
                      did_you_mean(str(value), choices))
        if dataclasses.is_dataclass(tp):
            return self.build(tp, value, key)
        if origin in (list, Sequence, tuple):
            if not isinstance(value, (list, tuple)):
                if origin is list and isinstance(value, str) and get_args(tp) and get_args(tp)[0] is str:
                    return [value]
                self.fail(key, f"expected a list, got {type(value).__name__}")
            (item_type, *_rest) = get_args(tp) or (Any,)
            return [self.convert(item_type, item, f"{key}.{i}") for i, item in enumerate(value)]
        if origin is dict:
            if not isinstance(value, Mapping):
                self.fail(key, f"expected a mapping, got {type(value).__name__}")
            _, value_type = get_args(tp) or (str, Any)
            return {str(k): self.convert(value_type, v, f"{key}.{k}") for k, v in value.items()}
        if tp is bool:
            if isinstance(value, bool):
                return value
            self.fail(key, f"expected true or false, got {value!r}")
        if tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            self.fail(key, f"expected an integer, got {value!r}")
        if tp is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            self.fail(key, f"expected a number, got {value!r}")
        if tp is str:
            if isinstance(value, str):
                return value
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            self.fail(key, f"expected a string, got {type(value).__name__}")
        if tp is Path:
            if isinstance(value, (str, Path)):
                return Path(value)
            self.fail(key, f"expected a path, got {type(value).__name__}")
        return value


def from_dict(cls: type[T], data: Mapping[str, Any], *, source: _LineMap | Origins | None = None) -> T:
    """Build ``cls`` from a plain mapping; unknown keys and wrong types raise ConfigError.

    ``source`` says where keys came from: one file's line map, or ``Origins`` for merged files and
    command-line overrides.
    """
    origins = source if isinstance(source, Origins) else Origins().add_file(source)
    return _Builder(origins).build(cls, data, "")


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (),
                *, base: Mapping[str, Any] | None = None) -> T:
    """Read ``path`` (optional), apply ``overrides``, and build ``cls``.

    ``base`` holds defaults that the file and overrides sit on top of (a pipeline's shared section).
    """
    data: dict[str, Any] = deep_merge({}, dict(base or {}))
    linemap = None
    if path is not None:
        file_data, linemap = read_yaml(path)
        data = deep_merge(data, file_data)
    data = apply_overrides(data, overrides)
    return from_dict(cls, data, source=Origins(path).add_file(linemap).add_overrides(overrides))


def deep_merge(into: dict[str, Any], other: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge ``other`` into a copy of ``into``; ``other`` wins on conflicts."""
    # Deep copies: YAML aliases (&anchor / *ref) make several sections one object, and a later
    # override of one must not leak into the others.
    merged = copy.deepcopy(dict(into))
    for key, value in other.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(dict(merged[key]), value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def to_dict(config: Any) -> Any:
    """A config as plain data (for manifests and cache keys): paths become strings."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {str(k): to_dict(v) for k, v in config.items()}
    if isinstance(config, Path):
        return str(config)
    return config


def describe(cls: type, prefix: str = "", defaults: Any = None) -> list[tuple[str, str, str]]:
    """(key, default, help) for every field, nested sections flattened, for ``--help-config``.

    Defaults are shown as the YAML a user would write (``outputs/sft``, ``null``, ``[a, b]``); a
    section's defaults are those of the instance its parent builds (SFT's ``training.output_dir`` is
    ``outputs/sft``, not the generic one).
    """
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if defaults is not None:
            default: Any = getattr(defaults, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(describe(hints[f.name], key + ".", default if default is not dataclasses.MISSING else None))
            continue
        shown = "(required)" if default is dataclasses.MISSING else _yaml_text_of(default)
        rows.append((key, shown, f.metadata.get("help", "")))
    return rows
