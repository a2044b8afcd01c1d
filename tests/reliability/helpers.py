"""What the reliability tests share: a small chat dataset, a fast SFT config, and ways to reach into
a stage run (an extra callback) and to read an adapter."""

from __future__ import annotations

from pathlib import Path

import pytest

from stages.core.config import load_config
from stages.sft import SFTConfig
from tests.conftest import write_jsonl

CHATS = [
    {"messages": [{"role": "user", "content": f"Route ticket {i}: {problem}"},
                  {"role": "assistant", "content": f"Queue: {queue}"}]}
    for i in range(6)
    for problem, queue in (("my invoice is wrong", "billing"), ("the parcel never arrived", "shipping"))
]


def chat_file(tmp_path: Path, rows=CHATS, name: str = "chats.jsonl") -> Path:
    return write_jsonl(tmp_path / name, rows)


def sft_config(output_dir: Path, data_file: Path, *overrides: str) -> SFTConfig:
    """12 chats, batch 2: 6 steps an epoch, so 8 steps cross an epoch boundary. Dropout is on, so a
    resumed run matches only if the RNG state is restored too. No eval, no sample generations."""
    return load_config(SFTConfig, None, [
        f"data.datasets=[{{path: '{data_file}'}}]", "data.eval_ratio=0.0", "data.sample_prompts=0",
        f"training.output_dir='{output_dir}'", "training.max_steps=8", "training.batch_size=2",
        "training.learning_rate=1e-2", "training.warmup_ratio=0.25", "training.logging_steps=1",
        "training.save_steps=2", "training.save_total_limit=3",
        "lora.r=4", "lora.alpha=8", "lora.dropout=0.1", *overrides])


def with_extra_callbacks(monkeypatch, *extra) -> None:
    """Make the SFT stage's trainer also run ``extra`` callbacks (after its own)."""
    import stages.sft
    from stages.core.training import callbacks

    monkeypatch.setattr(stages.sft, "callbacks", lambda *a, **k: [*callbacks(*a, **k), *extra])


def adapter_tensors(directory: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(Path(directory) / "adapter_model.safetensors")


def assert_same_adapter(a: Path, b: Path, atol: float = 1e-6) -> None:
    import torch

    first, second = adapter_tensors(a), adapter_tensors(b)
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")


def checkpoints(output_dir: Path) -> list[str]:
    folder = output_dir.with_name(output_dir.name + ".partial") / "checkpoints"
    return sorted((p.name for p in folder.glob("checkpoint-*")), key=lambda n: int(n.split("-")[1])) \
        if folder.is_dir() else []


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    from stages.core.modeling import ModelConfig, load_base

    return load_base(ModelConfig(name=str(tiny_model_dir)))
