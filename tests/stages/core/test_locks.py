"""One writer per directory: a live holder stops a second run at once (naming its pid, host and start
time), and a lock left by a killed process is taken over."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from stages.core.locks import LockHeld, lock_directory

HOLD = """
import sys, time
from stages.core.locks import lock_directory
lock_directory(sys.argv[1], purpose="test directory")
print("locked", flush=True)
time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """Start a process holding the lock of a directory; yields (process, directory)."""
    processes = []

    def start(directory: Path) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True,
                                   env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[3])})
        processes.append(process)
        assert process.stdout.readline().strip() == "locked"
        return process

    yield start
    for process in processes:
        process.kill()
        process.wait()


@pytest.mark.spawn
def test_a_live_holder_is_named_and_a_dead_ones_lock_is_taken_over(tmp_path, holder, capsys):
    directory = tmp_path / "out"
    process = holder(directory)
    with pytest.raises(LockHeld, match=rf"pid {process.pid} on {socket.gethostname()}, started 20\d\d-") as err:
        lock_directory(directory, purpose="sft output directory")
    assert "another lorelay process is writing this sft output directory" in str(err.value)

    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (tmp_path / "out.lock").is_file(), "a killed holder leaves its lock file"
    lock = lock_directory(directory, purpose="sft output directory")
    assert f"from a process that is gone (pid {process.pid}" in capsys.readouterr().err
    assert f'"pid": {os.getpid()}' in (tmp_path / "out.lock").read_text()
    lock.release()
    assert not (tmp_path / "out.lock").exists()


@pytest.mark.spawn
def test_a_second_stage_on_a_live_output_directory_stops_before_touching_it(tmp_path, holder):
    from stages.core.training import StageOutput

    checkpoint = tmp_path / "sft.partial" / "checkpoints" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    holder(tmp_path / "sft")
    with pytest.raises(LockHeld, match="sft output directory"):
        StageOutput(tmp_path / "sft", stage="sft", restart=True)
    assert checkpoint.is_dir(), "the live run's checkpoints were touched"


@pytest.mark.spawn
def test_a_second_run_on_a_live_run_directory_stops_at_once(tmp_path, holder, monkeypatch):
    import pipelines.runner as runner

    chats = tmp_path / "chats.jsonl"  # a valid pipeline: lorelay run checks every stage before it locks
    chats.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n')
    (tmp_path / "pipeline.yaml").write_text(f"name: tiny\nrun_dir: {tmp_path / 'run'}\nstages:\n  - name: sft\n"
                                            f"    settings: {{data: {{datasets: [{{path: {chats}}}]}}}}\n")
    holder(tmp_path / "run")
    monkeypatch.setattr(runner, "load_base", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(LockHeld, match="writing this run directory: pid"):
        runner.run_pipeline(tmp_path / "pipeline.yaml")


def test_stages_default_to_their_own_output_directories():
    from stages.core.training import stage_output_dir

    assert {stage_output_dir(None, name) for name in ("cpt", "sft", "rm")} == \
        {Path("outputs/cpt"), Path("outputs/sft"), Path("outputs/rm")}
    assert stage_output_dir("elsewhere/x", "sft") == Path("elsewhere/x")
