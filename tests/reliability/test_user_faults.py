"""Faults a user causes get one line with the path and a hint, and exit code 2; never a traceback.
Each is found before the model loads where it can be (the loader is watched), and a full disk while
saving publishes nothing half-written."""

from __future__ import annotations

import errno
import os
import shutil

import pytest

import pipelines.single as single
import stages.core.modeling as modeling
from pipelines.cli import main
from tests.conftest import write_jsonl

CHATS = [{"messages": [{"role": "user", "content": f"Route ticket {i}"},
                       {"role": "assistant", "content": "billing"}]} for i in range(8)]


def sft_args(tmp_path, model: str, *extra: str) -> list[str]:
    data = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    return ["sft", f"model.name={model}", f"data.datasets=[{{path: {data}}}]", "data.eval_ratio=0",
            "data.sample_prompts=0", "training.max_steps=1", "training.batch_size=4", "lora.r=2", "lora.alpha=4",
            f"training.output_dir={tmp_path / 'out'}", *extra]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lorelay: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def model_loads(monkeypatch):
    """Counts calls of the model loader (through load_base) without changing what it does."""
    calls = []
    real = modeling.load_base

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(single, "load_base", counted, raising=False)
    monkeypatch.setattr(modeling, "load_base", counted)
    return calls


def test_a_truncated_model_file_is_named_before_loading(tmp_path, tiny_model_dir, capsys):
    broken = tmp_path / "model"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    assert main(sft_args(tmp_path, str(broken))) == 2
    line = one_line_error(capsys)
    assert f"{weights} field 'model.name': unreadable weights" in line and "damaged or incomplete" in line


def test_a_missing_local_model_directory_is_not_taken_for_a_hub_id(tmp_path, capsys):
    missing = tmp_path / "models" / "my-model"
    assert main(sft_args(tmp_path, str(missing))) == 2
    line = one_line_error(capsys)
    assert f"{missing} field 'model.name': no such model directory" in line and "Repo id" not in line


@pytest.mark.parametrize("where", ["under_a_file", "read_only"])
def test_an_output_directory_that_cannot_be_written_is_found_before_the_model_loads(
        tmp_path, tiny_model_dir, capsys, model_loads, monkeypatch, where):
    if where == "under_a_file":
        (tmp_path / "file").write_text("not a directory")
        output = tmp_path / "file" / "out"
        expected = f"cannot create the output directory: '{tmp_path / 'file'}' is a file"
    else:  # a read-only mount: root ignores chmod, so the probe write fails as the kernel would make it
        (tmp_path / "ro").mkdir()
        output = tmp_path / "ro" / "out"
        real = os.open

        def read_only(path, flags, *args, **kwargs):
            if str(path).startswith(str(tmp_path / "ro")):
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return real(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", read_only)
        expected = "cannot write the output directory: the file system is read-only"
    assert main(sft_args(tmp_path, str(tiny_model_dir), f"training.output_dir={output}")) == 2
    line = one_line_error(capsys)
    assert expected in line and "training.output_dir" in line
    assert model_loads == []


def test_a_full_disk_while_saving_is_one_line_and_publishes_nothing(tmp_path, tiny_model_dir, capsys, monkeypatch):
    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # where a full disk shows on a real file system: the flush
    assert main(sft_args(tmp_path, str(tiny_model_dir))) == 2
    line = one_line_error(capsys)
    assert f"{tmp_path / 'out'} field 'training.output_dir': the disk is full while writing the output" in line
    assert "run the same command again" in line
    assert not (tmp_path / "out").exists()


def test_an_unknown_sharegpt_speaker_is_one_line_with_its_line_before_the_model_loads(tmp_path, capsys,
                                                                                      model_loads):
    rows = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "narrator", "value": "hello"}]}]
    data = write_jsonl(tmp_path / "chats.jsonl", rows)
    assert main(["sft", f"data.datasets=[{{path: {data}}}]", f"training.output_dir={tmp_path / 'out'}"]) == 2
    line = one_line_error(capsys)
    assert f"{data}:2 field 'conversations[1].from'" in line and "unknown speaker 'narrator'" in line
    assert model_loads == []
