"""``lorelay run`` checks every stage before the base model loads: a mistake in the last stage fails in
seconds, with the place it was made; ``--dry-run`` prints the plan and loads nothing."""

from __future__ import annotations

import json
import time

import pytest
import yaml

import pipelines.runner as runner
from pipelines.cli import main
from pipelines.validate import check_pipeline
from stages.core.errors import ConfigError, DataError, LorelayError
from tests.conftest import write_jsonl
from tests.pipelines.test_runner import data, pairs, sft_stage, write_pipeline  # noqa: F401 (fixture)


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the base model was loaded before the pipeline was checked")

    monkeypatch.setattr(runner, "load_base", refuse)


def dpo_stage(files, datasets=None, **settings) -> dict:
    datasets = datasets or [files["pairs"]]
    return {"name": "dpo", "init_from": "sft",
            "settings": {"data": {"datasets": [{"path": str(path)} for path in datasets]}, **settings}}


def line_of(path, text: str) -> int:
    return next(number for number, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def test_a_bad_key_in_the_last_stage_fails_in_seconds_before_the_model_loads(tmp_path, tiny_model_dir, data,
                                                                              no_model_loads, capsys):
    path = write_pipeline(tmp_path, tiny_model_dir, data,
                          [sft_stage(data), dpo_stage(data, training={"learnig_rate": 1e-4})])
    started = time.perf_counter()
    assert main(["run", str(path)]) == 2
    elapsed = time.perf_counter() - started
    error = capsys.readouterr().err.strip()
    assert error == (f"lorelay: error: {path}:{line_of(path, 'learnig_rate')} field 'training.learnig_rate': "
                     "stage 'dpo': unknown key 'learnig_rate' in DPOTraining (did you mean 'learning_rate'?)")
    assert elapsed < 10, f"took {elapsed:.1f} s"
    assert not (tmp_path / "run").exists()


def test_a_stage_override_is_blamed_as_an_override(tmp_path, tiny_model_dir, data, no_model_loads):
    path = write_pipeline(tmp_path, tiny_model_dir, data, [sft_stage(data), dpo_stage(data)])
    with pytest.raises(ConfigError) as err:
        check_pipeline(path, ["dpo.lora.r=0"])
    assert str(err.value) == "stage 'dpo': override 'dpo.lora.r=0': must be a positive integer"
    plan = check_pipeline(path, ["sft.data.datasets.0.weight=0.5"])
    assert plan.stages[0].planned.config.data.datasets[0].weight == 0.5


@pytest.mark.parametrize("stage_change, message", [
    ({"config": "configs/nope.yaml"}, "configs/nope.yaml: config file not found"),
    ({"gates": ["eval_accuracy >> 0.5"]}, "gate 'eval_accuracy >> 0.5' is not of the form"),
    ({"gates": ["eval_reward_acuracy >= 0.5"]},
     "gate 'eval_reward_acuracy >= 0.5' names metric 'eval_reward_acuracy', which stage 'dpo' does not report "
     "(did you mean 'eval_reward_accuracy'?)"),
    ({"gates": ["task_accuracy >= parent.eval_reward_accuracy"]},
     "names metric 'eval_reward_accuracy', which its parent 'sft' does not report"),
    ({"init_from": "gen"}, "stage 'dpo' starts from 'gen', a generate stage that trains no adapter"),
    ({"inputs": {"reward_model": "sft"}}, "takes its reward model from 'sft', a sft stage, not a reward model"),
    ({"settings": {"data": {"datasets": [{"path": "missing.jsonl"}]}}}, "missing.jsonl: stage 'dpo': file not found"),
    ({"name": "gen", "type": "generate", "init_from": "auto", "inputs": {"reward_model": "sft"},
      "settings": {"temperature": 0}}, "field 'temperature': stage 'gen': must be above 0 for sampling, got 0"),
])
def test_every_stage_is_checked_before_the_first_one_runs(tmp_path, tiny_model_dir, data, no_model_loads,
                                                           stage_change, message):
    gen = {"name": "gen", "type": "generate", "inputs": {"reward_model": "sft"},
           "settings": {"prompts": {"path": str(data["prompts"])}}}
    stages = [sft_stage(data), {**dpo_stage(data), **stage_change}]
    if stage_change.get("init_from") == "gen":
        stages.insert(1, {**gen, "inputs": {}, "settings": {**gen["settings"], "reward_model": str(tmp_path)}})
    path = write_pipeline(tmp_path, tiny_model_dir, data, stages)
    with pytest.raises(LorelayError) as err:
        check_pipeline(path)
    assert message in str(err.value)


def test_a_bad_first_row_in_a_later_stage_is_found_with_its_line(tmp_path, tiny_model_dir, data, no_model_loads):
    bad = write_jsonl(tmp_path / "bad.jsonl", [pairs(1)[0], {"prompt": "Q?", "chosen": "A", "rejeted": "B"}])
    path = write_pipeline(tmp_path, tiny_model_dir, data,
                          [sft_stage(data), dpo_stage(data, [bad])])
    with pytest.raises(DataError) as err:
        check_pipeline(path)
    assert str(err.value).startswith(f"{bad}:2 field 'rejected': stage 'dpo': required field is missing")


def test_task_accuracy_gates_need_evaluation_tasks(tmp_path, tiny_model_dir, data, no_model_loads):
    path = write_pipeline(tmp_path, tiny_model_dir, data, [sft_stage(data, gates=["task_accuracy >= 0.5"])],
                          evaluation={})
    with pytest.raises(ConfigError, match="needs 'task_accuracy', which is measured only when evaluation.tasks is set"):
        check_pipeline(path)


def test_a_run_directory_under_a_file_is_refused_before_loading(tmp_path, tiny_model_dir, data, no_model_loads):
    (tmp_path / "file").write_text("")
    path = write_pipeline(tmp_path, tiny_model_dir, data, [sft_stage(data)], run_dir=str(tmp_path / "file" / "run"))
    with pytest.raises(LorelayError, match="cannot create the run directory: .* is a file"):
        check_pipeline(path)


def test_dry_run_prints_the_plan_and_loads_nothing(tmp_path, tiny_model_dir, data, no_model_loads, capsys,
                                                   monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    stages = [sft_stage(data), {"name": "rm", "init_from": "none",
                                "settings": {"data": {"datasets": [{"path": str(data["pairs"])}]}}},
              {"name": "gen", "type": "generate", "inputs": {"reward_model": "rm"},
               "settings": {"prompts": {"path": str(data["prompts"])}}},
              dpo_stage(data)]
    stages[3]["data_from"] = ["gen"]  # its dataset.jsonl does not exist yet: not sampled
    path = write_pipeline(tmp_path, tiny_model_dir, data, stages)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    plan = check_pipeline(path)
    (run_dir / "run.json").write_text(json.dumps({"stages": [
        {"name": "sft", "key": plan.stages[0].planned.key, "status": "done"},
        {"name": "rm", "key": "changed", "status": "done"}, {"name": "gen", "status": "failed"}]}))
    assert main(["run", str(path), "--dry-run", "--force", "dpo"]) == 0
    out = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "sft sft base run its output is missing or changed since it finished" in out
    assert "rm rm base run its config, data or base model changed" in out
    assert "gen generate sft run the last attempt failed" in out
    assert "dpo dpo sft run --force" in out and "nothing loaded or trained" in out
    assert sorted(p.name for p in run_dir.iterdir()) == ["run.json"]


def test_an_evaluation_batch_size_below_one_is_refused_before_loading(tmp_path, tiny_model_dir, data, no_model_loads):
    path = write_pipeline(tmp_path, tiny_model_dir, data, [sft_stage(data)], evaluation={"batch_size": 0})
    with pytest.raises(ConfigError, match=r"evaluation\.batch_size.*must be at least 1"):
        check_pipeline(path)
