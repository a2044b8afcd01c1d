"""SIGTERM and Ctrl-C: the first signal checkpoints at the next step boundary and exits 130 saying how
to resume; a second one aborts at once. Tested with real signals, to a real `lorelay sft` process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages.core.training import StopRequest, verify_output
from tests.reliability.helpers import chat_file

REPO = Path(__file__).resolve().parents[2]


def lorelay(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "LORELAY_QUIET": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def write_config(tmp_path: Path, model_dir: Path, steps: int) -> Path:
    config = tmp_path / "sft.yaml"
    config.write_text(f"""\
model: {{name: '{model_dir}'}}
lora: {{r: 4, alpha: 8, dropout: 0.0}}
data: {{datasets: [{{path: '{chat_file(tmp_path)}'}}], eval_ratio: 0.0, sample_prompts: 0}}
training: {{output_dir: '{tmp_path / "sft"}', max_steps: {steps}, batch_size: 2, save_steps: 3,
           learning_rate: 1.0e-3, logging_steps: 1}}
""")
    return config


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"lorelay exited early ({process.returncode}): {process.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"{path} never appeared")
        time.sleep(0.02)


@pytest.mark.spawn
def test_sigterm_checkpoints_exits_130_and_resume_finishes(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir, steps=10)
    process = lorelay("sft", "--config", str(config))
    wait_for(tmp_path / "sft.partial" / "checkpoints" / "checkpoint-3", process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=240)

    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    assert "SIGTERM received: saving a checkpoint at the end of this step" in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("lorelay: SIGTERM received: stopped at step ") and " of 10." in last
    assert f"resume with: lorelay sft --config {config} --resume" in last
    step = int(last.split("stopped at step ")[1].split()[0])
    assert 3 <= step < 10
    assert (tmp_path / "sft.partial" / "checkpoints" / f"checkpoint-{step}").is_dir()
    assert f"checkpoint-{step}" in last and not (tmp_path / "sft").exists()

    resumed = lorelay("sft", "--config", str(config), "--resume")
    _, stderr = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, stderr[-3000:]
    assert f"resuming sft from {tmp_path / 'sft.partial' / 'checkpoints' / f'checkpoint-{step}'}" in stderr
    verify_output(tmp_path / "sft")
    metrics = json.loads((tmp_path / "sft" / "metrics.json").read_text())
    assert metrics["steps"] == 10
    assert [e["step"] for e in metrics["log_history"] if "loss" in e] == list(range(1, 11))
    assert not (tmp_path / "sft.partial").exists()


def test_a_second_signal_aborts_at_once_and_handlers_are_restored():
    before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    stop = StopRequest()
    with pytest.raises(KeyboardInterrupt):
        with stop.installed():
            os.kill(os.getpid(), signal.SIGINT)  # first Ctrl-C: only noted
            time.sleep(0.01)
            assert stop.signal == "SIGINT"
            os.kill(os.getpid(), signal.SIGINT)  # second: raises here and now
            time.sleep(1)
            pytest.fail("the second Ctrl-C did not abort")
    assert {number: signal.getsignal(number) for number in before} == before


def test_outside_the_main_thread_no_handler_is_installed():
    import threading

    seen = []

    def body():
        with StopRequest().installed():
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == [signal.getsignal(signal.SIGTERM)]
