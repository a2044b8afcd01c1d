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
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import write_jsonl

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ACCELERATE = Path(sys.executable).parent / "accelerate"
# Measured on CPU (2 steps, lr 1e-2, LoRA dropout 0): train loss 11.5049686 vs 11.5049691 (relative
# 4e-8), per-step grad norms equal to 7 digits, adapter weights (|w| up to 0.13) differ by at most
# 6e-6. Not bit-exact: gloo all-reduces per-rank gradient sums in another order than one process
# sums four samples, and Adam's division by sqrt(v) amplifies those float32 rounding differences
# on near-zero gradients. atol 5e-5 is 0.5% of one Adam step at lr 1e-2.
TOLERANCE = dict(rtol=1e-3, atol=5e-5)
LOSS_RTOL = 1e-4


def chats(n: int) -> list[dict]:
    labels = ["billing", "shipping"]
    return [{"messages": [{"role": "user", "content": f"Route this ticket: case {i} about {labels[i % 2]}"},
                          {"role": "assistant", "content": labels[i % 2]}]} for i in range(n)]


def pairs(n: int) -> list[dict]:
    return [{"prompt": f"Question {i}?", "chosen": f"Answer {i}. — Support", "rejected": f"Answer {i}."}
            for i in range(n)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "ACCELERATE_DISABLE_RICH": "1"}


def launch(args: list[str], processes: int, timeout: int = 240) -> subprocess.CompletedProcess:
    if processes == 1:
        command = [sys.executable, "-m", "pipelines.cli", *args]
    else:
        command = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", str(processes),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(free_port()), "-m", "pipelines.cli", *args]
    result = subprocess.run(command, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-6000:]}")
    return result


def training(batch_size: int, steps: int = 2) -> dict:
    return {"max_steps": steps, "batch_size": batch_size, "learning_rate": 1e-2, "logging_steps": 1,
            "warmup_ratio": 0.0, "save_steps": None}


def sft_config(tmp_path: Path, tiny_model_dir: Path, name: str, batch_size: int) -> Path:
    data = write_jsonl(tmp_path / "data" / "sft.jsonl", chats(16))
    config = {"model": {"name": str(tiny_model_dir)}, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
              "data": {"datasets": [{"path": str(data)}], "eval_ratio": 0.25, "sample_prompts": 1},
              "sample_max_new_tokens": 2,
              "training": {**training(batch_size), "output_dir": str(tmp_path / name)}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def adapter(directory: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(directory / "adapter_model.safetensors")


def assert_one_output(parent: Path, name: str) -> dict:
    """Exactly one finished stage directory: a manifest, no .partial/.previous leftovers."""
    leftovers = sorted(p.name for p in parent.iterdir() if p.is_dir() and p.name.startswith(name + "."))
    assert leftovers == [], leftovers
    manifests = list((parent / name).rglob("manifest.json"))
    assert manifests == [parent / name / "manifest.json"], manifests
    return json.loads(manifests[0].read_text())


def test_sft_two_processes_match_one_process_with_the_same_global_batch(tmp_path, tiny_model_dir):
    two = sft_config(tmp_path, tiny_model_dir, "sft2", batch_size=2)
    one = sft_config(tmp_path, tiny_model_dir, "sft1", batch_size=4)
    launch(["sft", "--config", str(two)], processes=2)
    launch(["sft", "--config", str(one)], processes=1)

    manifest = assert_one_output(tmp_path, "sft2")
    assert manifest["effective"]["world_size"] == 2
    assert manifest["effective"]["global_batch_size"] == 4
    assert json.loads((tmp_path / "sft1" / "manifest.json").read_text())["effective"]["global_batch_size"] == 4

    metrics2 = json.loads((tmp_path / "sft2" / "metrics.json").read_text())
    metrics1 = json.loads((tmp_path / "sft1" / "metrics.json").read_text())
    assert metrics2["steps"] == metrics1["steps"] == 2
    assert metrics2["train_loss"] == pytest.approx(metrics1["train_loss"], rel=LOSS_RTOL)

    import torch

    weights2, weights1 = adapter(tmp_path / "sft2"), adapter(tmp_path / "sft1")
    assert weights2.keys() == weights1.keys()
    moved = False
    for key in weights1:
        torch.testing.assert_close(weights2[key], weights1[key], **TOLERANCE, msg=key)
        moved |= bool("lora_B" in key and weights1[key].abs().max() > 0)
    assert moved, "the adapter did not train"


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
