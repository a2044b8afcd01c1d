"""Free disk space is checked before every checkpoint: a full disk stops the run with a clear message
and the last checkpoint intact, instead of a crash halfway through writing one."""

from __future__ import annotations

import shutil
from collections import namedtuple

import pytest
from transformers import TrainerCallback

from stages.core.errors import LorelayError
from stages.sft import run
from stages.core.training import StageOutput, check_free_disk
from tests.reliability.helpers import base, chat_file, checkpoints, sft_config, with_extra_callbacks  # noqa: F401

Usage = namedtuple("Usage", "total used free")


class DiskFillsAt(TrainerCallback):
    def __init__(self, step: int, disk: dict):
        self.step, self.disk = step, disk

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            self.disk["free"] = 3 << 20


def test_a_full_disk_stops_before_the_checkpoint_keeping_the_last_one(tmp_path, base, monkeypatch):
    disk = {"free": 100 << 30}
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(200 << 30, 0, disk["free"]))
    with_extra_callbacks(monkeypatch, DiskFillsAt(3, disk))

    with pytest.raises(LorelayError) as info:
        run(sft_config(tmp_path / "sft", chat_file(tmp_path), "training.max_steps=6"), base)

    message = str(info.value)
    assert "only 3 MiB free" in message and "the checkpoint at step 4" in message
    assert "checkpoint-2" in message and "--resume" in message
    assert checkpoints(tmp_path / "sft") == ["checkpoint-2"]
    assert not (tmp_path / "sft").exists()


def test_a_stage_does_not_start_on_a_nearly_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(1 << 30, 0, 100 << 20))
    with pytest.raises(LorelayError, match="only 100 MiB free, 512 MiB needed"):
        StageOutput(tmp_path / "sft", stage="sft")


def test_the_probe_climbs_to_an_existing_parent(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(shutil, "disk_usage", lambda path: seen.append(path) or Usage(1, 0, 1 << 40))
    check_free_disk(tmp_path / "not" / "yet" / "made")
    assert seen == [tmp_path]
