"""Two processes on CPU (issue 7): `accelerate launch --multi_gpu --num_processes 2` over gloo.

Each test launches the real command line (`-m pipelines.cli`) on the tiny random model, so what runs
is what `make sft GPUS=2` runs, minus CUDA. `--multi_gpu` on a machine without a GPU falls back to
gloo with `use_cpu` (lorelay's trainer_args sets it); `--cpu` with two processes would need MPI.

Equivalence: one process with batch_size 4 and two processes with batch_size 2 see the same four
samples per optimizer step (accelerate shards each global batch across ranks), so the trained
adapters must agree up to floating point: gloo sums the two ranks' gradients in a different order
than one process sums four samples, and the loss normalisation crosses devices. See TOLERANCE.
"""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import chats, pairs, write_jsonl
from tests.distributed.launch import assert_one_output, assert_same_training, launch, sft_config, training

pytestmark = [pytest.mark.slow, pytest.mark.spawn]


def test_sft_two_processes_match_one_process_with_the_same_global_batch(tmp_path, tiny_model_dir, one_process_sft):
    two = sft_config(tmp_path, tiny_model_dir, "sft2", batch_size=2)
    launch(["sft", "--config", str(two)], processes=2)

    manifest = assert_one_output(tmp_path, "sft2")
    assert manifest["effective"]["world_size"] == 2
    assert manifest["effective"]["global_batch_size"] == 4
    assert manifest["effective"]["distributed"] == "MULTI_CPU"
    assert json.loads((one_process_sft / "manifest.json").read_text())["effective"]["global_batch_size"] == 4
    assert_same_training(tmp_path / "sft2", one_process_sft)


def test_pipeline_two_processes_then_cached(tmp_path, tiny_model_dir):
    """SFT then DPO (DPO under two processes is covered here), then the same command again."""
    sft_data = write_jsonl(tmp_path / "data" / "sft.jsonl", chats(16))
    pair_data = write_jsonl(tmp_path / "data" / "pairs.jsonl", pairs(16))
    tasks = write_jsonl(tmp_path / "data" / "tasks.jsonl", [{"prompt": "Route this ticket: case 99 about billing",
                                                             "answer": "billing"}] * 2)
    pipeline = {
        "name": "tiny", "run_dir": str(tmp_path / "run"),
        "base": {"model": {"name": str(tiny_model_dir)}, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "stages": [
            {"name": "sft", "settings": {"data": {"datasets": [{"path": str(sft_data)}], "eval_ratio": 0.25,
                                                  "sample_prompts": 1},
                                         "training": training(2), "sample_max_new_tokens": 2}},
            {"name": "dpo", "settings": {"data": {"datasets": [{"path": str(pair_data)}], "eval_ratio": 0.25},
                                         "training": training(2)},
             "gates": ["steps >= 2"]},
        ],
        "evaluation": {"tasks": str(tasks), "task_max_new_tokens": 3},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    launch(["run", str(path)], processes=2)

    run_dir = tmp_path / "run"
    for stage in ("sft", "dpo"):
        manifest = assert_one_output(run_dir, stage)
        training_config = manifest["config"]["training"]
        assert manifest["effective"]["world_size"] == 2
        assert manifest["effective"]["global_batch_size"] == 2 * training_config["gradient_accumulation_steps"] * 2
    assert json.loads((run_dir / "dpo" / "metrics.json").read_text())["steps"] == 2
    run = json.loads((run_dir / "run.json").read_text())
    assert [(s["name"], s["status"]) for s in run["stages"]] == [("sft", "done"), ("dpo", "done")]
    assert (run_dir / "report.md").is_file()

    # Again: every rank reads the same run.json and takes the same (cached) decisions; no deadlock.
    launch(["run", str(path)], processes=2)
    run = json.loads((run_dir / "run.json").read_text())
    assert [s["status"] for s in run["stages"]] == ["cached", "cached"]


def test_a_failure_names_its_rank(tmp_path, tiny_model_dir):
    config = {"model": {"name": str(tiny_model_dir)},
              "data": {"datasets": [{"path": str(tmp_path / "missing.jsonl")}]},
              "training": {**training(2), "output_dir": str(tmp_path / "sft")}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(AssertionError) as failure:
        launch(["sft", "--config", str(path)], processes=2, timeout=120)
    assert "lorelay [rank 1]" in str(failure.value) or "lorelay [rank 0]" in str(failure.value)
    assert not (tmp_path / "sft").exists()
