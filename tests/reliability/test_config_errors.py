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
    (DATA + "lora: {r: 8}\n", ["lora.r=0"], "lorelay: error: override 'lora.r=0': must be a positive integer\n"),
    (DATA, ["training.batchsize=4"], "override 'training.batchsize=4': unknown key 'batchsize' in TrainingConfig "
                                     "(did you mean 'batch_size'?)"),
    (DATA + "training:\n  max_steps: many\n", [], "sft.yaml:3 field 'training.max_steps': expected an integer, "
                                                  "got 'many'"),
    (DATA + "training:\n  on_nonfinite: skipp\n", [], "field 'training.on_nonfinite': expected one of stop, skip; "
                                                      "got 'skipp' (did you mean 'skip'?)"),
    (DATA + "lora: [16]\n", [], "sft.yaml:2 field 'lora': expected a mapping for LoraSettings, got list"),
    ("data: {datasets: [{path: train.jsonl, fromat: sharegpt}]}\n", [],
     "field 'data.datasets.0.fromat': unknown key 'fromat' in DatasetSpec (did you mean 'format'?)"),
])
@pytest.mark.spawn
def test_config_errors_name_the_key_and_suggest_the_closest(tmp_path, yaml_text, overrides, expected):
    config = tmp_path / "sft.yaml"
    config.write_text(yaml_text)
    done = lorelay_sft(config, *overrides)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert expected in done.stderr, done.stderr


@pytest.mark.spawn
def test_a_missing_config_file_suggests_its_neighbour(tmp_path):
    (tmp_path / "sft.yaml").write_text(DATA)
    done = lorelay_sft(tmp_path / "stf.yaml")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{tmp_path / 'stf.yaml'}: config file not found (did you mean '{tmp_path / 'sft.yaml'}'?)" in done.stderr


def test_warmup_stable_decay_really_decays(tmp_path, tiny_model_dir):
    """transformers reads num_decay_steps=0 as 'never decay'; fit() derives it from decay_ratio."""
    import json

    from stages.core.config import load_config
    from stages.core.modeling import ModelConfig, load_base
    from stages.sft import SFTConfig, run
    from tests.conftest import write_jsonl

    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
            for i in range(16)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    config = load_config(SFTConfig, None, [
        f"data.datasets=[{{path: {data}}}]", "data.eval_ratio=0.0", "data.sample_prompts=0",
        f"training.output_dir={tmp_path / 'out'}", "training.max_steps=10", "training.batch_size=2",
        "training.lr_scheduler=warmup_stable_decay", "training.decay_ratio=0.3", "training.warmup_ratio=0.0",
        "training.logging_steps=1", "training.min_lr_ratio=0.0", "lora.r=2", "lora.alpha=4"])
    output = run(config, load_base(ModelConfig(name=str(tiny_model_dir))))
    rates = [e["learning_rate"] for e in json.loads((output / "metrics.json").read_text())["log_history"]
             if "learning_rate" in e]
    assert rates[0] == rates[5] == config.training.learning_rate
    assert rates[-1] < 0.5 * config.training.learning_rate
