"""Atomic outputs: a stage directory appears whole or not at all, its manifest's checksums are
checked when it is loaded, and a crash at any point of a commit never leaves a directory that loads
as complete (nor destroys the earlier result, or anything that is not a lorelay stage)."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

import stages.core.training.outputs
from stages.core.errors import DataError, LorelayError
from stages.core.training import StageOutput, verify_output

BASE = SimpleNamespace(config=SimpleNamespace(name="tiny"), path="tiny", fingerprint="abc", quantization="none",
                       dtype="float32", attn_implementation="sdpa", template_source="tokenizer")


def commit(output_dir, content: str) -> None:
    output = StageOutput(output_dir, stage="sft")
    (output.staging / "adapter_model.safetensors").write_text(content)
    output.write_json("metrics.json", {"loss": 1.0})
    output.commit(config={"lr": 1}, base=BASE)


def test_commit_writes_checksums_that_verify(tmp_path):
    commit(tmp_path / "sft", "v1")
    manifest = verify_output(tmp_path / "sft")
    assert set(manifest["files"]) == {"adapter_model.safetensors", "metrics.json"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft"]  # no .partial, no .previous


@pytest.mark.parametrize("crash_at", ["fsync_tree", "file_checksums"])
def test_a_crash_before_the_rename_leaves_the_earlier_result_whole(tmp_path, monkeypatch, crash_at):
    commit(tmp_path / "sft", "v1")

    def crash(*args, **kwargs):
        raise OSError("simulated crash")

    monkeypatch.setattr(stages.core.training.outputs, crash_at, crash)
    with pytest.raises(OSError):
        commit(tmp_path / "sft", "v2")
    verify_output(tmp_path / "sft")
    assert (tmp_path / "sft" / "adapter_model.safetensors").read_text() == "v1"


def test_a_crash_between_the_two_renames_is_undone_by_the_next_stage(tmp_path, monkeypatch):
    commit(tmp_path / "sft", "v1")
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the earlier result is aside, the new one not yet in place
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(stages.core.training.outputs.os, "replace", replace)
    with pytest.raises(OSError):
        commit(tmp_path / "sft", "v2")
    monkeypatch.undo()

    with pytest.raises(LorelayError, match="no manifest.json"):
        verify_output(tmp_path / "sft")  # nothing there loads as complete
    StageOutput(tmp_path / "sft", stage="sft")  # the next run puts the earlier, whole result back
    verify_output(tmp_path / "sft")
    assert (tmp_path / "sft" / "adapter_model.safetensors").read_text() == "v1"


def test_a_half_assembled_result_is_never_reused(tmp_path):
    output = StageOutput(tmp_path / "sft", stage="sft", resume=True)
    (output.staging / "stale.json").write_text("{}")
    again = StageOutput(tmp_path / "sft", stage="sft", resume=True)
    assert not (again.staging / "stale.json").exists()


@pytest.mark.parametrize("damage, phrase", [
    (lambda d: (d / "adapter_model.safetensors").write_text("changed"), "checksum mismatch for adapter_model"),
    (lambda d: (d / "adapter_model.safetensors").unlink(), "missing: adapter_model.safetensors"),
    (lambda d: (d / "manifest.json").unlink(), "no manifest.json"),
    (lambda d: (d / "manifest.json").write_text('{"files": '), "not valid JSON"),
    (lambda d: (d / "manifest.json").write_text("[]"), "no file checksums"),
    (lambda d: (d / "manifest.json").write_text('{"stage": "sft"}'), "no file checksums"),
    (lambda d: (d / "manifest.json").write_text(json.dumps({"files": {"../secret": "0"}})), "outside the stage"),
])
def test_a_damaged_stage_does_not_load(tmp_path, damage, phrase):
    commit(tmp_path / "sft", "v1")
    damage(tmp_path / "sft")
    with pytest.raises(LorelayError, match=phrase):
        verify_output(tmp_path / "sft")


def test_an_output_dir_that_is_not_a_lorelay_stage_is_never_replaced(tmp_path):
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("years of work")
    with pytest.raises(LorelayError, match="refusing to replace what is not a lorelay stage"):
        StageOutput(precious, stage="sft")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    with pytest.raises(LorelayError, match="not a directory"):
        StageOutput(a_file, stage="sft")
    assert (precious / "chapter1.tex").read_text() == "years of work" and a_file.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "thesis"]


def test_a_stage_failing_on_its_data_leaves_the_earlier_output_alone(tmp_path, tiny_model_dir):
    from stages.core.modeling import ModelConfig, load_base
    from stages.sft import run
    from tests.reliability.helpers import sft_config

    commit(tmp_path / "sft", "v1")
    before = {p.name: p.read_bytes() for p in (tmp_path / "sft").iterdir()}
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                    b'{"messages": 5}\n')
    base = load_base(ModelConfig(name=str(tiny_model_dir)))
    with pytest.raises(DataError, match="bad.jsonl:2"):
        run(sft_config(tmp_path / "sft", bad), base)
    assert {p.name: p.read_bytes() for p in (tmp_path / "sft").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "sft"]  # no .partial either
