"""training.use_liger_kernel reaches TRL's config on CUDA and is refused, naming the key, where it cannot run."""

from __future__ import annotations

import importlib.util
import types

import pytest
import torch

from stages.core.errors import ConfigError
from stages.core.training import TrainingConfig, trainer_args


def test_liger_is_refused_when_not_installed(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else real(name, *a))
    with pytest.raises(ConfigError, match="liger-kernel is not installed") as caught:
        TrainingConfig(use_liger_kernel=True)
    assert caught.value.field == "use_liger_kernel"


def test_liger_is_refused_on_cpu_and_off_by_default(monkeypatch, tmp_path):
    from trl import SFTConfig

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "liger_kernel" else real(name, *a))
    training = TrainingConfig(use_liger_kernel=True)
    cpu = types.SimpleNamespace(device="cpu", dtype=torch.float32, activation_checkpointing=False)
    with pytest.raises(ConfigError, match="need a CUDA GPU"):
        trainer_args(SFTConfig, training, cpu, tmp_path, has_eval=False)
    assert trainer_args(SFTConfig, TrainingConfig(), cpu, tmp_path, has_eval=False).use_liger_kernel is False
