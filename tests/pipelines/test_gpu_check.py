"""pipelines/gpu_check.py: `make gpu-check`'s whole plan, dry-run on CPU with the tiny model, so the script cannot rot.

On CPU the same checks run as on a GPU (the demo chain in 4-bit, the SFT variants, the accelerate configs,
the merge's fidelity, the GPU benchmark's dry run, whose results are checked here); only what needs a GPU
kernel, package or launcher says "skip", with its reason.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pipelines import gpu_check

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.chain]


def test_the_dry_run_runs_every_check_of_the_plan_and_none_fails(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = gpu_check.main(["--dry-run", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "gpu-check.json")])
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    results = {row["name"]: row for row in report["results"]}
    failed = {name: row["detail"] for name, row in results.items() if row["status"] == "fail"}
    assert code == 0 and not failed, failed

    planned = [name for name, _ in gpu_check.plan(gpu_check.Target(True, "unused", tmp_path))]
    assert list(results) == planned
    assert {"chain", "sft[sdpa]", "sft[sdpa_packed]", "sft[checkpointing on]", "sft[checkpointing off]",
            "launch[ddp]", "merge", "bench"} <= {name for name, row in results.items() if row["status"] == "pass"}
    for name, row in results.items():  # a skip always says why: a missing package, or CPU
        if row["status"] == "skip":
            assert "not installed" in row["detail"] or "needs a GPU" in row["detail"], (name, row["detail"])

    run = json.loads((tmp_path / "work" / "chain" / "run.json").read_text())
    assert {stage["name"]: stage["status"] for stage in run["stages"]} == {
        name: "done" for name in ("cpt", "sft", "rm", "generate", "dpo", "grpo")}
    assert run["base"]["quantization"] == "4bit"
    merge = json.loads((tmp_path / "work" / "merged" / "manifest.json").read_text())["merge"]
    assert (merge["merge_base"], merge["trained_quantization"]) == ("dequantized", "4bit")
    assert merge["max_logit_diff"] < gpu_check.MERGE_TOLERANCE * merge["logit_scale"]
    assert_gpu_bench_dry_run(json.loads((tmp_path / "work" / "bench-gpu.json").read_text()))


def assert_gpu_bench_dry_run(results: dict) -> None:
    """``make bench-gpu``'s code paths, from its dry run inside the check above (``bench/gpu.py --dry-run``)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu import markdown

    assert results["dry_run"] and results["matmul_tflops"] >= 0 and results["peak_source"] == "the measured matmul rate"
    (lora,) = [r for r in results["runs"] if r["quantization"] == "none"]
    assert lora["attention"] == "sdpa_packed"
    assert set(lora["stages"]) == {"sft", "dpo"}  # both stages ran through their own run()
    for stage in lora["stages"].values():
        assert {"tokens_per_s", "peak_memory_gib", "mfu", "flops_per_token", "step_time_s"} <= stage.keys()
        assert stage["flops_per_token"] > 4 * lora["n_matmul_params"]  # 4N plus attention
    assert lora["stages"]["dpo"]["batching"] == "packed, prompt shared"
    assert any("4bit" in reason for reason in results["skipped"])
    table = markdown(results)
    assert "| stage | base | attention | Liger |" in table and "6·N" not in table


def test_without_cuda_the_real_check_says_how_to_run_it(capsys):
    assert gpu_check.main([]) == 2
    assert "--dry-run" in capsys.readouterr().err
