"""Typed configs: unknown keys, wrong types and bad YAML are named by file, line and key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from stages.core.config import describe, field, load_config, to_dict
from stages.core.errors import ConfigError


@dataclasses.dataclass
class Inner:
    rate: float = field(1e-3, help="a rate")
    steps: int = field(10, help="steps")
    mode: str = field("fast", help="mode")


@dataclasses.dataclass
class Outer:
    name: str = field("x", help="a name")
    inner: Inner = field(default_factory=Inner, help="inner section")
    tags: list[str] = field(default_factory=list, help="tags")
    path: Path | None = field(None, help="a path")


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_build_typed_config(tmp_path):
    path = write(tmp_path, "name: run\ninner:\n  rate: 2e-4\n  steps: 5\ntags: [a, b]\npath: some/dir\n")
    config = load_config(Outer, path, ["inner.steps=7", "inner.mode=slow"])
    assert config.inner.rate == pytest.approx(2e-4)
    assert config.inner.steps == 7 and config.inner.mode == "slow"
    assert config.tags == ["a", "b"] and config.path == Path("some/dir")
    assert to_dict(config)["path"] == "some/dir"


def test_unknown_key_names_line_and_suggests(tmp_path):
    path = write(tmp_path, "name: run\ninner:\n  rate: 1e-4\n  stpes: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(Outer, path)
    message = str(err.value)
    assert f"{path}:4" in message and "inner.stpes" in message and "did you mean 'steps'" in message


def test_wrong_type_names_key(tmp_path):
    path = write(tmp_path, "inner:\n  steps: many\n")
    with pytest.raises(ConfigError, match=r"c.yaml:2 field 'inner.steps': expected an integer"):
        load_config(Outer, path)


def test_unknown_override_key_suggests():
    with pytest.raises(ConfigError, match="did you mean 'rate'"):
        load_config(Outer, None, ["inner.rat=3"])


def test_invalid_yaml_names_line(tmp_path):
    path = write(tmp_path, "name: run\ninner: [unclosed\n")
    with pytest.raises(ConfigError, match=r"c.yaml:\d+: invalid YAML"):
        load_config(Outer, path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Outer, tmp_path / "nope.yaml")


def test_describe_lists_nested_keys_with_help():
    rows = {key: help_text for key, _, help_text in describe(Outer)}
    assert rows["inner.rate"] == "a rate" and "tags" in rows


def test_union_prefers_the_values_own_type():
    from stages.core.modeling import LoraSettings

    assert load_config(LoraSettings, None, ["target_modules=all-linear"]).target_modules == "all-linear"
    assert load_config(LoraSettings, None, ["target_modules=[q_proj, v_proj]"]).target_modules == ["q_proj", "v_proj"]


def test_deep_merge_copies_so_yaml_aliases_stay_independent():
    from stages.core.config import deep_merge

    shared = {"training": {"lr": 1}}
    one, two = deep_merge({}, shared), deep_merge({}, shared)
    one["training"]["lr"] = 2
    assert two["training"]["lr"] == 1 and shared["training"]["lr"] == 1


@dataclasses.dataclass
class Item:
    path: str = field(help="a path")
    weight: float | None = field(None, help="a weight")


@dataclasses.dataclass
class WithList:
    items: list[Item] = field(default_factory=list, help="items")
    rank: int = field(8, help="a rank")

    def __post_init__(self):
        if self.rank < 1:
            raise ConfigError("must be >= 1", field="rank")


def test_list_index_overrides_change_and_add_items(tmp_path):
    path = write(tmp_path, "items:\n  - {path: a.jsonl}\n  - {path: b.jsonl}\n")
    config = load_config(WithList, path, ["items.1.weight=0.5", "items.2.path=c.jsonl"])
    assert [(i.path, i.weight) for i in config.items] == [("a.jsonl", None), ("b.jsonl", 0.5), ("c.jsonl", None)]
    assert load_config(WithList, None, ["items.0.path=x.jsonl"]).items[0].path == "x.jsonl"


@pytest.mark.parametrize("override, message", [
    ("items.5.weight=1", r"override 'items.5.weight=1': 'items' has 1 item\(s\), so index 5 is out of range "
                         r"\(indexes 0-0 change an item, 1 adds one\)"),
    ("items.weight=1", r"'items' is a list; name an item by its index \(e.g. items.0.weight=..., or items=\[...\]"),
    ("rank.x=1", r"override 'rank.x=1': 'rank' is 3, not a section"),
])
def test_bad_list_overrides_say_how_to_write_them(tmp_path, override, message):
    path = write(tmp_path, "items: [{path: a.jsonl}]\nrank: 3\n")
    with pytest.raises(ConfigError, match=message):
        load_config(WithList, path, [override])


def test_an_override_is_blamed_not_the_file_line_of_its_key(tmp_path):
    path = write(tmp_path, "items: [{path: a.jsonl}]\nrank: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(WithList, path, ["rank=0"])
    assert str(err.value) == "override 'rank=0': must be >= 1"
    with pytest.raises(ConfigError) as err:
        load_config(WithList, path, ["items.0.wieght=2"])
    assert str(err.value).startswith("override 'items.0.wieght=2': unknown key 'wieght' in Item (did you mean")
    path.write_text("items: [{path: a.jsonl}]\nrank: 0\n")  # the same mistake in the file names the file's line
    with pytest.raises(ConfigError, match=r"c.yaml:2 field 'rank': must be >= 1"):
        load_config(WithList, path, ["items.0.weight=2"])


def test_describe_shows_defaults_as_yaml():
    rows = {key: default for key, default, _ in describe(Outer)}
    assert rows == {"name": "x", "inner.rate": "0.001", "inner.steps": "10", "inner.mode": "fast",
                    "tags": "[]", "path": "null"}
    from stages.generate import GenerateConfig

    generate = {key: default for key, default, _ in describe(GenerateConfig)}
    assert generate["output_dir"] == "outputs/generate" and generate["prompts.path"] == "data/demo/prompts.jsonl"
