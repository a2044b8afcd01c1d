"""One stage registry: a stage registered in one place is a CLI subcommand, a pipeline type and a report column."""

from __future__ import annotations

import json

import pytest
import yaml

from pipelines import cli, report
from pipelines.model_card import card_metadata
from stages import registry
from stages.core.errors import ConfigError
from stages.core.stage import Metric, Stage


@pytest.fixture
def echo_registered(monkeypatch):
    monkeypatch.setitem(registry.RECIPES, "echo", "tests.pipelines.echo_stage")


def test_every_registered_recipe_declares_its_stage():
    stages = registry.stages()
    assert [s.name for s in stages] == list(registry.RECIPES)
    assert {s.name for s in stages if s.produces_policy} == {"cpt", "sft", "dpo", "grpo"}
    assert [s.name for s in stages if s.produces_reward_model] == ["rm"]
    with pytest.raises(ConfigError, match="unknown stage type 'sfft'") as caught:
        registry.get("sfft")
    assert caught.value.hint == "did you mean 'sft'?"


def test_a_stage_record_refuses_a_multi_line_description():
    with pytest.raises(ValueError, match="one line"):
        Stage(name="x", config_class=Metric, run=print, description="a\nb", produces_policy=False)


@pytest.mark.chain
def test_a_registered_stage_is_a_subcommand_a_pipeline_type_and_a_report_column(
        echo_registered, tmp_path, tiny_model_dir, capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "Write a message several times (test stage)." in capsys.readouterr().out

    out = tmp_path / "alone"
    assert cli.main(["echo", f"model.name={tiny_model_dir}", "message=hi", f"output_dir={out}"]) == 0
    assert (out / "echo.txt").read_text() == "hi\n"
    assert "echoes" in capsys.readouterr().out

    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({
        "name": "echoing", "run_dir": str(tmp_path / "run"), "base": {"model": {"name": str(tiny_model_dir)}},
        "stages": [{"name": "shout", "type": "echo", "settings": {"message": "hey", "times": 3}}]}))
    assert cli.main(["run", str(pipeline)]) == 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert [(s["name"], s["type"], s["status"]) for s in run["stages"]] == [("shout", "echo", "done")]
    assert (tmp_path / "run" / "shout" / "echo.txt").read_text() == "hey\nhey\nhey\n"
    lines = (tmp_path / "run" / "report.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| stage |")).split(" | ")
    shout = next(line for line in lines if line.startswith("| shout |")).split(" | ")
    assert shout[:4] == ["| shout", "echo", "base", "done"] and shout[header.index("echo count")] == "3"
    assert run["policy"] is None  # a stage that produces no policy is never the one to publish

    meta = card_metadata({"stage": "echo"}, rows=[{"type": "echo"}], merged=False)
    assert "echo-test" in meta["tags"]


def test_report_columns_follow_the_stage_types_of_the_run(echo_registered):
    sft_only = [m.title for m in report.columns({"stages": [{"type": "sft"}]})]
    wins = ["checks won", "checks lost", "judge won", "judge lost", "RM says won", "RM says lost"]
    assert sft_only == ["task acc", "ppl", "eval loss", *wins]
    with_rm_and_dpo = [m.title for m in report.columns({"stages": [{"type": "rm"}, {"type": "dpo"}],
                                                        "checks": ["sign_off"]})]
    assert with_rm_and_dpo == ["task acc", "ppl", "sign off", "eval loss", "RM acc", "DPO acc", *wins]
    assert registry.get("rm").headline[1].render(0.875) == "87.5%" and Metric("n", "n", "{:d}").render(3.0) == "3"
