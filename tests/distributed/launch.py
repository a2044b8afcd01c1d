"""Launching lorelay's real command line under `accelerate launch` on CPU (gloo), for the distributed tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import chats, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
ACCELERATE = Path(sys.executable).parent / "accelerate"
# Measured on CPU (2 steps, lr 1e-2, LoRA dropout 0): train loss 11.5049686 vs 11.5049691 (relative
# 4e-8), per-step grad norms equal to 7 digits, adapter weights (|w| up to 0.13) differ by at most
# 6e-6. Not bit-exact: gloo all-reduces per-rank gradient sums in another order than one process
# sums four samples, and Adam's division by sqrt(v) amplifies those float32 rounding differences
# on near-zero gradients. atol 5e-5 is 0.5% of one Adam step at lr 1e-2.
TOLERANCE = dict(rtol=1e-3, atol=5e-5)
LOSS_RTOL = 1e-4


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


def start_machine(rank: int, port: int, args: list[str], log: Path, *, machines: int = 2) -> subprocess.Popen:
    """One "machine" of a multi-node launch on this host: its own launcher, one process, main at 127.0.0.1."""
    command = [str(ACCELERATE), "launch", "--multi_gpu", "--num_machines", str(machines),
               "--num_processes", str(machines), "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
               "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "pipelines.cli", *args]
    return subprocess.Popen(command, cwd=ROOT, env=env(), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a launcher and its workers (torch's elastic agent starts each worker in a session of its own)."""
    import psutil

    if process.poll() is None:
        for child in psutil.Process(process.pid).children(recursive=True):
            child.kill()
        process.kill()
    process.wait()


def run_machines(args: list[str], tmp_path: Path, *, timeout: int = 240) -> list[str]:
    """Launch both machines, wait for both; their logs. A non-zero exit fails with both logs."""
    port = free_port()
    logs = [tmp_path / f"machine{rank}.log" for rank in (0, 1)]
    machines = [start_machine(rank, port, args, logs[rank]) for rank in (0, 1)]
    try:
        codes = [machine.wait(timeout=timeout) for machine in machines]
    finally:
        for machine in machines:
            kill_tree(machine)
    texts = [log.read_text() for log in logs]
    if any(codes):
        raise AssertionError(f"machines exited {codes}\n" + "\n".join(text[-4000:] for text in texts))
    return texts


def assert_same_training(run: Path, reference: Path) -> None:
    """Same steps, same loss (LOSS_RTOL) and the same adapter (TOLERANCE), and the adapter really trained."""
    import pytest
    import torch

    metrics, expected = (json.loads((d / "metrics.json").read_text()) for d in (run, reference))
    assert metrics["steps"] == expected["steps"] == 2
    assert metrics["train_loss"] == pytest.approx(expected["train_loss"], rel=LOSS_RTOL)
    weights, reference_weights = adapter(run), adapter(reference)
    assert weights.keys() == reference_weights.keys()
    moved = False
    for key in reference_weights:
        torch.testing.assert_close(weights[key], reference_weights[key], **TOLERANCE, msg=key)
        moved |= bool("lora_B" in key and reference_weights[key].abs().max() > 0)
    assert moved, "the adapter did not train"
