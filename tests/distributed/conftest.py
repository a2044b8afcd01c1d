"""The single-process run that the distributed runs are compared with."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.launch import launch, sft_config


@pytest.fixture(scope="session")
def one_process_sft(tmp_path_factory, tiny_model_dir) -> Path:
    """SFT with one process and batch 4: the global batch of every 2-process run here (2 x batch 2)."""
    tmp_path = tmp_path_factory.mktemp("one-process")
    launch(["sft", "--config", str(sft_config(tmp_path, tiny_model_dir, "sft1", batch_size=4))], processes=1)
    return tmp_path / "sft1"
