"""Config errors through the real CLI: the message names the file, line and key, suggests the closest
valid name, and the process exits 2 without a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = "data: {datasets: [{path: train.jsonl}]}\n"


def lorelay_sft(config: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "pipelines.cli", "sft", "--config", str(config), *overrides],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("yaml_text, overrides, expected", [
    (DATA + "training:\n  learnig_rate: 1.0e-3\n", [],
     "sft.yaml:3 field 'training.learnig_rate': unknown key 'learnig_rate' in TrainingConfig "
     "(did you mean 'learning_rate'?)"),
    (DATA + "trainig: {epochs: 1}\n", [], "sft.yaml:2 field 'trainig': unknown key 'trainig' in SFTConfig "
                                          "(did you mean 'training'?)"),
    (DATA, ["training.batchsize=4"], "field 'training.batchsize': unknown key 'batchsize' in TrainingConfig "
                                     "(did you mean 'batch_size'?)"),
    (DATA + "training:\n  max_steps: many\n", [], "sft.yaml:3 field 'training.max_steps': expected an integer, "
                                                  "got 'many'"),
    (DATA + "training:\n  on_nonfinite: skipp\n", [], "field 'training.on_nonfinite': expected one of stop, skip; "
                                                      "got 'skipp' (did you mean 'skip'?)"),
    (DATA + "lora: [16]\n", [], "sft.yaml:2 field 'lora': expected a mapping for LoraSettings, got list"),
    ("data: {datasets: [{path: train.jsonl, fromat: sharegpt}]}\n", [],
     "field 'data.datasets.0.fromat': unknown key 'fromat' in DatasetSpec (did you mean 'format'?)"),
])
def test_config_errors_name_the_key_and_suggest_the_closest(tmp_path, yaml_text, overrides, expected):
    config = tmp_path / "sft.yaml"
    config.write_text(yaml_text)
    done = lorelay_sft(config, *overrides)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert expected in done.stderr, done.stderr


def test_a_missing_config_file_suggests_its_neighbour(tmp_path):
    (tmp_path / "sft.yaml").write_text(DATA)
    done = lorelay_sft(tmp_path / "stf.yaml")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{tmp_path / 'stf.yaml'}: config file not found (did you mean '{tmp_path / 'sft.yaml'}'?)" in done.stderr
