"""The benchmarks run end to end on the tiny model and write every key; no timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SETUP_KEYS = {"step_time_s", "peak_rss_mb", "baseline_rss_mb", "peak_rss_above_baseline_mb", "padding_fraction",
              "details", "step_time_s_rounds"}
SFT_KEYS = SETUP_KEYS | {"reply_tokens_per_s", "real_tokens_per_s", "loss_tokens_per_s", "processed_tokens_per_s",
                         "tokens_per_step", "unmatched_samples"}
SFT_RATIO_KEYS = {"reply_tokens_per_s", "real_tokens_per_s", "loss_tokens_per_s", "processed_tokens_per_s",
                  "speedup_step_time", "peak_rss", "peak_rss_above_baseline", "speedup_per_round"}


def run(*command: str, timeout: int = 900) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_cpu_bench_writes_every_result_key(tmp_path, tiny_model_dir):
    out = tmp_path / "results.json"
    run("bench/run.py", "--model", str(tiny_model_dir), "--steps", "2", "--warmup", "1", "--samples", "4",
        "--batch-size", "2", "--dpo-steps", "2", "--dpo-warmup", "1", "--dpo-samples", "8",
        "--dpo-large-shape", "tiny", "--dpo-large-samples", "4", "--out", str(out), "--log", str(tmp_path / "bench.log"))
    results = json.loads(out.read_text())

    assert {"date", "loadavg_before", "loadavg_after", "environment", "workload", "sft", "dpo",
            "dpo_weight_bound", "targets"} <= results.keys()
    sft = results["sft"]
    assert sft["setups"].keys() == {"a", "b", "c", "d"}
    for name, setup in sft["setups"].items():
        assert SFT_KEYS <= setup.keys(), (name, SFT_KEYS - setup.keys())
        assert setup["unmatched_samples"] == 0, name  # every batch's samples were recognised
    assert sft["same_samples"], "the three set-ups must train on the same samples"
    assert sft["setups"]["c"]["padding_fraction"] == 0.0  # padding-free
    assert sft["setups"]["a"]["padding_fraction"] > sft["setups"]["b"]["padding_fraction"] > 0
    # lorelay's loss falls on the replies only; the others' on every token
    c_tokens = sft["setups"]["c"]["tokens_per_step"]
    assert c_tokens["loss"] == c_tokens["reply"] < c_tokens["real"]
    for key in ("c_over_a", "c_over_b", "d_over_b"):
        assert SFT_RATIO_KEYS <= sft["ratios"][key].keys()

    dpo = results["dpo"]
    assert dpo["setups"].keys() == {"lorelay", "trl"}
    for name, setup in dpo["setups"].items():
        assert SETUP_KEYS <= setup.keys(), (name, SETUP_KEYS - setup.keys())
    assert "adapter" in dpo["setups"]["lorelay"]["details"]["reference"]
    assert {"step_time", "peak_rss", "peak_rss_above_baseline"} <= dpo["ratios"]["lorelay_over_trl"].keys()
    large = results["dpo_weight_bound"]  # a random model of the named shape, one pair per step
    assert large["setups"]["lorelay"]["details"]["batch_size"] == 1
    assert large["setups"]["trl"]["details"]["gradient_accumulation_steps"] == 1
    assert "random-tiny" in results["workload"]["dpo_weight_bound"]["model"]

    assert len(results["targets"]) == 5
    for target in results["targets"]:
        assert target["value"] is not None and isinstance(target["met"], bool), target


@pytest.mark.slow
def test_gpu_bench_dry_run_exercises_its_code_paths_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    result = run("bench/gpu.py", "--dry-run", "--out", str(out))
    results = json.loads(out.read_text())
    assert results["dry_run"] and results["matmul_tflops"] >= 0
    (lora,) = [r for r in results["runs"] if r["quantization"] == "none"]
    assert {"tokens_per_s", "peak_memory_gib", "mfu_4n", "mfu_6n", "n_matmul_params"} <= lora.keys()
    assert lora["mfu_6n"] == pytest.approx(1.5 * lora["mfu_4n"], rel=1e-2, abs=1e-4)
    assert any("4bit" in reason for reason in results["skipped"])
    assert "| base | attention | Liger |" in result.stdout


def test_gpu_bench_without_cuda_says_so():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    result = subprocess.run([sys.executable, "bench/gpu.py"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "needs a CUDA GPU" in result.stderr and "--dry-run" in result.stderr
