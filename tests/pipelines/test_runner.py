"""The pipeline runner on the tiny model: the chain, the cache, lineage, continuation, gates."""

from __future__ import annotations

import dataclasses
import json
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
import yaml

import pipelines.runner as runner
from pipelines.validate import check_pipeline
from stages import registry
from pipelines.runner import GateFailed, load_pipeline, run_pipeline
from stages.core.errors import ConfigError
from tests.conftest import chats, pairs, write_jsonl

TRAIN = {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-2, "logging_steps": 1, "warmup_ratio": 0.0}


@pytest.fixture
def data(tmp_path) -> dict[str, Path]:
    folder = tmp_path / "data"
    files = {
        "sft": write_jsonl(folder / "sft.jsonl", chats(16)),
        "pairs": write_jsonl(folder / "pairs.jsonl", pairs(16)),
        "tasks": write_jsonl(folder / "tasks.jsonl", [{"prompt": "Route this ticket: case 99 about billing",
                                                       "answer": "billing"}] * 2),
        "prompts": write_jsonl(folder / "prompts.jsonl", [{"prompt": f"Question {i}?"} for i in range(3)]),
    }
    corpus = folder / "corpus"
    corpus.mkdir()
    (corpus / "doc1.txt").write_text("Nimbus robots sweep floors. " * 40)
    (corpus / "doc2.txt").write_text("The Nimbus Pal answers questions. " * 40)
    files["corpus"] = corpus
    files["heldout"] = folder / "heldout.txt"
    files["heldout"].write_text("Nimbus robots sweep floors and answer questions. " * 10)
    return files


def write_pipeline(tmp_path: Path, tiny_model_dir: Path, data: dict[str, Path], stages: list[dict],
                   **extra) -> Path:
    pipeline = {
        "name": "tiny",
        "run_dir": str(tmp_path / "run"),
        "base": {"model": {"name": str(tiny_model_dir)}, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "stages": stages,
        "evaluation": {"tasks": str(data["tasks"]), "prompts": str(data["prompts"]),
                       "perplexity_text": str(data["heldout"]), "max_new_tokens": 4, "task_max_new_tokens": 3},
        **extra,
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    return path


def sft_stage(data, name="sft", **extra) -> dict:
    return {"name": name, "type": "sft", "settings": {
        "data": {"datasets": [{"path": str(data["sft"])}], "eval_ratio": 0.25, "sample_prompts": 1},
        "training": TRAIN, "sample_max_new_tokens": 2}, **extra}


def all_stages(data) -> list[dict]:
    return [
        {"name": "cpt", "settings": {"data": {"sources": [{"path": str(data["corpus"])}], "block_size": 64},
                                     "training": TRAIN}},
        sft_stage(data),
        {"name": "rm", "settings": {"data": {"datasets": [{"path": str(data["pairs"])}], "eval_ratio": 0.25},
                                    "training": TRAIN}},
        {"name": "generate", "inputs": {"reward_model": "rm"},
         "settings": {"prompts": {"path": str(data["prompts"])}, "samples_per_prompt": 2, "max_new_tokens": 4,
                      "min_score_gap": 0.0}},
        {"name": "dpo", "init_from": "sft", "inputs": {"reward_model": "rm"}, "data_from": ["generate"],
         "settings": {"data": {"datasets": [{"path": str(data["pairs"])}], "eval_ratio": 0.25},
                      "training": TRAIN}},
    ]


class Counter:
    """Wraps a function and counts its calls."""

    def __init__(self, function):
        self.function, self.calls = function, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.function(*args, **kwargs)


@pytest.fixture
def count_base_loads(monkeypatch):
    counter = Counter(runner.load_base)
    monkeypatch.setattr(runner, "load_base", counter)
    return counter


def statuses(run_dir: Path) -> dict[str, str]:
    run = json.loads((run_dir / "run.json").read_text())
    return {s["name"]: s["status"] for s in run["stages"]}


@pytest.mark.chain
@pytest.mark.slow
def test_whole_chain_runs_once_and_then_comes_from_cache(tmp_path, tiny_model_dir, data, count_base_loads):
    path = write_pipeline(tmp_path, tiny_model_dir, data, all_stages(data))
    run_dir = run_pipeline(path)

    assert count_base_loads.calls == 1
    run = json.loads((run_dir / "run.json").read_text())
    assert [s["name"] for s in run["stages"]] == ["cpt", "sft", "rm", "generate", "dpo"]
    assert all(s["status"] == "done" and len(s["key"]) == 64 for s in run["stages"])
    assert run["policy"] == "dpo" and run["base"]["fingerprint"] and run["versions"]["trl"]
    by_name = {s["name"]: s for s in run["stages"]}
    assert by_name["sft"]["init_from"] == "cpt" and by_name["dpo"]["init_from"] == "sft"
    assert by_name["dpo"]["parents"] == ["generate", "rm", "sft"]
    assert "task_accuracy" in by_name["sft"]["evaluation"]["metrics"]
    assert {"rm_wins", "rm_losses", "rm_ties", "rm_win_rate_vs_parent"} <= set(by_name["dpo"]["evaluation"]["metrics"])
    for name, stage in by_name.items():
        assert (run_dir / name / "manifest.json").exists(), name
        declared = registry.get(stage["type"]).metrics  # what gates may name, checked before a run
        undeclared = [key for key in stage["metrics"] if not any(fnmatchcase(key, p) for p in declared)]
        assert not undeclared, f"{name} reports metrics its Stage record does not declare: {undeclared}"
    generated = [json.loads(line) for line in (run_dir / "generate" / "dataset.jsonl").read_text().splitlines()]
    assert generated and all("provenance" in row for row in generated)
    report = (run_dir / "report.md").read_text()
    assert "| dpo | dpo | sft |" in report and (run_dir / "plots" / "loss_curves.png").exists()

    run_dir = run_pipeline(path)
    assert set(statuses(run_dir).values()) == {"cached"}


def test_checks_and_an_endpoint_judge_score_every_policy_against_its_parent(tmp_path, tiny_model_dir, data,
                                                                           monkeypatch):
    from tests.stages.core.test_judges import serve_chat_completions

    prompts = write_jsonl(tmp_path / "checked.jsonl", [{"prompt": f"Question {i}?", "sign_off": "Support" if i else ""}
                                                       for i in range(3)])
    evaluation = {"prompts": str(prompts), "max_new_tokens": 4,
                  "checks": [{"fn": "length", "args": {"max": 10000}, "name": "bounded"},
                             {"fn": "ends_with", "args": {"column": "sign_off"}, "name": "sign_off"}]}
    stages = [sft_stage(data, "sft", gates=["sign_off_rate >= parent.sign_off_rate", "bounded_rate >= 1"])]
    with serve_chat_completions(rule=lambda a, b: "A") as server:  # position bias only: every judged pair ties
        monkeypatch.setenv("TEST_JUDGE_KEY", "sk-1")
        evaluation["judge"] = {"url": f"http://127.0.0.1:{server.server_address[1]}/v1", "endpoint_model": "judge",
                               "api_key_env": "TEST_JUDGE_KEY"}
        run_dir = run_pipeline(write_pipeline(tmp_path, tiny_model_dir, data, stages, evaluation=evaluation))

    run = json.loads((run_dir / "run.json").read_text())
    assert run["checks"] == ["bounded", "sign_off"]
    base = run["base_evaluation"]["metrics"]
    assert base["bounded_rate"] == 1.0 and base["sign_off_rate"] == 0.0  # two rows expect a sign-off; none has it
    sft = run["stages"][0]
    assert sft["gates"] == ["sign_off_rate 0 >= 0", "bounded_rate 1 >= 1"]
    metrics = sft["evaluation"]["metrics"]
    assert (metrics["check_wins"], metrics["check_losses"], metrics["check_ties"]) == (0, 0, 3)
    assert metrics["judge_wins"] == metrics["judge_losses"] == 0 and metrics["judge_ties"] == 3
    assert not any(name.startswith("rm_") for name in metrics)  # no reward stage: no trained-RM opinion
    replies = {name: json.loads((run_dir / "eval" / f"{name}.json").read_text()) for name in ("base", "sft")}
    differing = sum(a["reply"] != b["reply"] for a, b in zip(replies["sft"], replies["base"]))
    assert len(server.requests) == 2 * differing  # each differing pair asked in both orders, identical ones never
    assert [r["checks"] for r in replies["sft"]] == [{"bounded": True, "sign_off": None}] + \
        [{"bounded": True, "sign_off": False}] * 2
    report = (run_dir / "report.md").read_text()
    assert "| sign off |" in report.replace("| bounded ", "") and "checks won" in report and "judge won" in report


def test_cache_reruns_a_changed_stage_and_its_descendants_only(tmp_path, tiny_model_dir, data, monkeypatch):
    stages = [sft_stage(data, "sft"), sft_stage(data, "sft2", init_from="sft"), sft_stage(data, "side", init_from="none")]
    path = write_pipeline(tmp_path, tiny_model_dir, data, stages, evaluation={})
    run_dir = run_pipeline(path)
    assert statuses(run_dir) == {"sft": "done", "sft2": "done", "side": "done"}
    keys = {s["name"]: s["key"] for s in json.loads((run_dir / "run.json").read_text())["stages"]}

    run_pipeline(path, ["sft.training.learning_rate=5e-3"])
    assert statuses(run_dir) == {"sft": "done", "sft2": "done", "side": "cached"}
    changed = {s["name"]: s["key"] for s in json.loads((run_dir / "run.json").read_text())["stages"]}
    assert changed["sft"] != keys["sft"] and changed["sft2"] != keys["sft2"] and changed["side"] == keys["side"]

    plan = check_pipeline(path, ["sft.training.learning_rate=5e-3"])
    assert [(s.action, s.reason) for s in plan.stages] == [("cached", "finished with the same config, data and parents")] * 3
    run_pipeline(path, ["sft.training.learning_rate=5e-3"], force=["side"])
    assert statuses(run_dir) == {"sft": "cached", "sft2": "cached", "side": "done"}


def test_a_run_killed_between_stages_continues(tmp_path, tiny_model_dir, data, monkeypatch):
    stages = [sft_stage(data, "sft"), sft_stage(data, "sft2")]
    path = write_pipeline(tmp_path, tiny_model_dir, data, stages, evaluation={})
    import stages.sft as sft_module

    real_run = sft_module.STAGE.run

    def dies_in_second_stage(config, base, adapter=None):
        if Path(config.training.output_dir).name == "sft2":
            raise KeyboardInterrupt
        return real_run(config, base, adapter=adapter)

    monkeypatch.setattr(sft_module, "STAGE", dataclasses.replace(sft_module.STAGE, run=dies_in_second_stage))
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(path)
    run_dir = tmp_path / "run"
    assert statuses(run_dir) == {"sft": "done", "sft2": "failed"}
    assert not (run_dir / "sft2" / "manifest.json").exists()

    counted = Counter(real_run)
    monkeypatch.setattr(sft_module, "STAGE", dataclasses.replace(sft_module.STAGE, run=counted))
    run_pipeline(path)
    assert statuses(run_dir) == {"sft": "cached", "sft2": "done"}
    assert counted.calls == 1


def test_a_failing_gate_stops_the_chain(tmp_path, tiny_model_dir, data):
    stages = [sft_stage(data, "sft", gates=["task_accuracy >= 1.5"]), sft_stage(data, "sft2")]
    path = write_pipeline(tmp_path, tiny_model_dir, data, stages)
    with pytest.raises(GateFailed, match=r"stage 'sft' failed its gate 'task_accuracy >= 1.5'"):
        run_pipeline(path)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert [s["name"] for s in run["stages"]] == ["sft"] and run["stages"][0]["gates"] == "failed"
    assert not (tmp_path / "run" / "sft2").exists()
    assert (tmp_path / "run" / "report.md").exists()


def test_pipeline_errors_name_the_problem(tmp_path, tiny_model_dir, data):
    path = write_pipeline(tmp_path, tiny_model_dir, data, [sft_stage(data, "sft", init_from="cpt")])
    with pytest.raises(ConfigError, match="refers to 'cpt', which is not an earlier stage"):
        load_pipeline(path, [])
    path = write_pipeline(tmp_path, tiny_model_dir, data, [{"name": "sfft"}])
    with pytest.raises(ConfigError, match="did you mean 'sft'"):
        load_pipeline(path, [])
    path = write_pipeline(tmp_path, tiny_model_dir, data, [sft_stage(data)])
    with pytest.raises(ConfigError, match="stage 'sft'.*did you mean 'learning_rate'"):
        run_pipeline(path, ["sft.training.learnin_rate=1"])
