"""Where config values come from: YAML files with the line of every key, merged layers, command-line overrides.

``stages.core.config`` builds the typed dataclasses from these and blames errors on the place a value came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from stages.core.errors import ConfigError, closest


class _LineMap:
    """Remembers the line of each dotted key in a YAML document, for error messages."""

    def __init__(self, source: str):
        self.source = source
        self.lines: dict[str, int] = {}

    def line(self, key: str) -> int | None:
        while key:
            if key in self.lines:
                return self.lines[key]
            key = key.rpartition(".")[0]
        return None


class Origins:
    """Where each dotted key of a merged config came from, so an error blames the right place.

    Layers are YAML files (or a section of one, under ``prefix``) in the order they were merged; a
    later layer wins, as in the merge. Command-line overrides win over every file: an error on a key
    that an override set names the override as the user typed it, not a file line.
    """

    def __init__(self, default_file: str | Path | None = None):
        self.default_file = str(default_file) if default_file is not None else None
        self.layers: list[tuple[_LineMap, str]] = []
        self.overrides: dict[str, str] = {}

    def add_file(self, linemap: _LineMap | None, prefix: str = "") -> "Origins":
        if linemap is not None:
            self.layers.append((linemap, f"{prefix}." if prefix and not prefix.endswith(".") else prefix))
            self.default_file = self.default_file or linemap.source
        return self

    def add_overrides(self, overrides: Sequence[str], shown_as: Sequence[str] | None = None) -> "Origins":
        """``overrides`` as applied (``lora.r=0``); ``shown_as`` as typed (``sft.lora.r=0``)."""
        for item, shown in zip(overrides, shown_as or overrides):
            self.overrides[item.partition("=")[0]] = shown
        return self

    def override(self, key: str) -> str | None:
        """The override that set ``key`` or a section holding it."""
        for set_key, shown in reversed(self.overrides.items()):
            if key == set_key or key.startswith(set_key + "."):
                return shown
        return None

    def locate(self, key: str) -> tuple[str | None, int | None]:
        """(file, line) of ``key``, or of its nearest section that a file sets."""
        probe = key
        while probe:
            for linemap, prefix in reversed(self.layers):
                if prefix + probe in linemap.lines:
                    return linemap.source, linemap.lines[prefix + probe]
            probe = probe.rpartition(".")[0]
        return self.default_file, None


def _walk_nodes(node: yaml.Node, prefix: str, lines: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            lines[key] = key_node.start_mark.line + 1
            _walk_nodes(value_node, key, lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            key = f"{prefix}.{index}"
            lines[key] = item.start_mark.line + 1
            _walk_nodes(item, key, lines)


def read_yaml(path: str | Path) -> tuple[dict[str, Any], _LineMap]:
    """Parse a YAML mapping and the line of each key; errors name the file and line."""
    path = Path(path)
    if not path.exists():
        hint = None
        if path.parent.is_dir():
            guess = closest(path.name, [p.name for p in path.parent.iterdir() if p.suffix in (".yaml", ".yml")])
            hint = f"did you mean '{path.parent / guess}'?" if guess else None
        raise ConfigError("config file not found", file=path, hint=hint)
    if path.is_dir():
        raise ConfigError("expected a YAML file, found a directory", file=path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"not UTF-8 text ({err.reason} at byte {err.start})", file=path) from None
    linemap = _LineMap(str(path))
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"invalid YAML: {problem}", file=path, line=line) from None
    if data is None:
        return {}, linemap
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of keys at the top level, found {type(data).__name__}",
                          file=path, line=1)
    _walk_nodes(node, "", linemap.lines)
    return data, linemap


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings (values parsed as YAML, so ``lr=1e-4`` is a float).

    A number indexes a list: ``data.datasets.0.weight=0.5`` sets the first dataset's weight, and the
    index just past the end adds an item (``data.datasets.1.path=more.jsonl``).
    """
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value",
                              hint="e.g. training.learning_rate=1e-4")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str) and raw.strip() != raw:
            value = raw
        parts = key.split(".")
        target: Any = data
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(target, list):
                index = _list_index(item, parts, depth, len(target))
                if index == len(target):
                    target.append({})
                if last:
                    target[index] = value
                    break
                if target[index] is None:
                    target[index] = {}
                target = target[index]
            elif isinstance(target, dict):
                if last:
                    target[part] = value
                    break
                if target.get(part) is None:
                    target[part] = [] if parts[depth + 1].isdigit() else {}
                target = target[part]
            else:
                section = ".".join(parts[:depth])
                raise ConfigError(f"override '{item}': '{section}' is {yaml_text(target)}, not a section",
                                  hint=f"set the whole value instead, e.g. {section}=...")
    return data


def _list_index(item: str, parts: list[str], depth: int, length: int) -> int:
    section = ".".join(parts[:depth])
    if not parts[depth].isdigit():
        raise ConfigError(f"override '{item}': '{section}' is a list; name an item by its index",
                          hint=f"e.g. {section}.0.{parts[depth]}=..., or {section}=[...] for the whole list")
    index = int(parts[depth])
    if index > length:
        raise ConfigError(f"override '{item}': '{section}' has {length} item(s), so index {index} is out of range",
                          hint=f"indexes 0-{length - 1} change an item, {length} adds one")
    return index


def yaml_text(value: Any) -> str:
    """Plain data as the YAML a user would write: ``outputs/sft``, ``null``, ``[a, b]``."""
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10**6).strip()
    return text.removesuffix("...").strip()
