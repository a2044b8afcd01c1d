"""The command line: options and overrides in any order, messages that say what is missing, one line of
description per subcommand, and ``--help-config`` that never cuts a key."""

from __future__ import annotations

import argparse
import io

import pytest

from pipelines.cli import build_parser, main


def subcommands(parser: argparse.ArgumentParser) -> dict[str, str | None]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {choice.dest: choice.help for choice in action._choices_actions}


def test_every_subcommand_has_a_one_line_description(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    parser = build_parser()
    described = subcommands(parser)
    assert set(described) >= {"sft", "run", "status", "chat", "data", "push", "merge"}
    lines = parser.format_help().splitlines()
    for name, description in described.items():
        assert description, f"'lorelay {name}' has no description"
        assert any(line.split() == [name, *description.split()] for line in lines), \
            f"'{name}: {description}' does not fit on one line of `lorelay --help`"


@pytest.mark.parametrize("argv", [
    ["run", "p.yaml", "sft.lora.r=4", "--force", "sft", "dpo.beta=0.2"],
    ["run", "--force", "sft", "p.yaml", "sft.lora.r=4", "dpo.beta=0.2"],
    ["run", "p.yaml", "--force", "sft", "sft.lora.r=4", "dpo.beta=0.2"],
])
def test_run_takes_options_and_overrides_in_any_order(argv):
    args = build_parser().parse_args(argv)
    assert (args.pipeline, args.overrides, args.force) == ("p.yaml", ["sft.lora.r=4", "dpo.beta=0.2"], ["sft"])


def test_a_stage_takes_overrides_before_its_config():
    args = build_parser().parse_args(["sft", "lora.r=4", "--config", "f.yaml", "training.max_steps=2", "--resume"])
    assert (args.config, args.overrides, args.resume) == ("f.yaml", ["lora.r=4", "training.max_steps=2"], True)


def test_run_without_arguments_says_only_the_pipeline_is_required(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2
    assert error == "lorelay run: error: the following arguments are required: pipeline"


@pytest.mark.parametrize("width", [40, 80, 200])
def test_help_config_shows_whole_keys_literal_brackets_and_yaml_defaults(width):
    from rich.console import Console

    from pipelines.config_help import print_config_help
    from stages.core.config import describe
    from stages.sft import SFTConfig

    out = io.StringIO()
    print_config_help(SFTConfig, Console(file=out, width=width))
    text = out.getvalue()
    for key, _, _ in describe(SFTConfig):
        assert key in text, f"key '{key}' is cut at width {width}"
    flat = " ".join(text.replace("│", " ").split())
    assert "e.g. [embed_tokens, lm_head]" in flat  # rich would read [embed_tokens, lm_head] as a style tag
    assert "PosixPath" not in text and "outputs/<stage>" in text and "null" in text
