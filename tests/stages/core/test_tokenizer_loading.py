"""stages.core.tokenizer_loading: a command that only tokenizes gets the tokenizer AutoTokenizer would
give, without AutoTokenizer (and torch) when the files show which class that is, and through AutoTokenizer
whenever they do not."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from stages.core.chat import assistant_mask
from stages.core.errors import LorelayError
from stages.core.modeling import ModelConfig
from stages.core.tokenizer_loading import load_tokenizer, loads_as_generic

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Does the mower dock itself?"},
        {"role": "assistant", "content": "Yes, when its battery runs low."}]


@pytest.fixture
def model_copy(tmp_path, smollm2_dir) -> Path:
    """The embedded model's tokenizer and config files, to alter (the weights are not needed)."""
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "chat_template.jinja"):
        shutil.copy(smollm2_dir / name, tmp_path / name)
    return tmp_path


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}), encoding="utf-8")


def test_alone_the_embedded_tokenizer_is_autotokenizers_and_masks_the_same(smollm2_dir, tokenizer):
    config = ModelConfig(name=str(smollm2_dir))
    assert loads_as_generic(smollm2_dir, config)

    alone, source = load_tokenizer(str(smollm2_dir), config, alone=True)
    trained, trained_source = load_tokenizer(str(smollm2_dir), config)

    assert type(alone) is type(trained) is type(tokenizer)
    assert source == trained_source == "tokenizer" and alone.chat_template == trained.chat_template
    assert alone.pad_token == trained.pad_token and alone.all_special_ids == trained.all_special_ids
    assert assistant_mask(alone, CHAT) == assistant_mask(trained, CHAT)


@pytest.mark.parametrize("change", ["declares its own class", "a model type autotokenizer overrides", "remote code",
                                    "no tokenizer.json", "mistral format", "trust_remote_code", "unreadable config"])
def test_alone_goes_through_autotokenizer_unless_the_files_say_what_it_would_load(model_copy, change):
    config = ModelConfig(name=str(model_copy), trust_remote_code=change == "trust_remote_code")
    assert loads_as_generic(model_copy, ModelConfig(name=str(model_copy)))
    if change == "declares its own class":
        edit_json(model_copy / "tokenizer_config.json", tokenizer_class="GPT2Tokenizer")
    elif change == "a model type autotokenizer overrides":
        edit_json(model_copy / "config.json", model_type="qwen2")  # Qwen2Tokenizer, whatever the files declare
    elif change == "remote code":
        edit_json(model_copy / "tokenizer_config.json", auto_map={"AutoTokenizer": [None, "tok.MyTokenizer"]})
    elif change == "no tokenizer.json":
        (model_copy / "tokenizer.json").unlink()
    elif change == "mistral format":
        (model_copy / "tekken.json").write_text("{}", encoding="utf-8")
    elif change == "unreadable config":
        (model_copy / "config.json").write_text("{not json", encoding="utf-8")
    assert not loads_as_generic(model_copy, config)


@pytest.mark.slow
def test_data_check_never_imports_torch_or_the_training_stack(tmp_path, smollm2_dir):
    """The check's own process never imports transformers (its template worker loads the tokenizer), and
    the tokenizer loaded alone, rendering and masking a chat as the worker does, needs nothing past transformers."""
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": CHAT}) + "\n", encoding="utf-8")
    heavy = "sorted(m for m in ('transformers', 'torch', 'trl', 'peft', 'accelerate') if m in sys.modules)"
    script = (
        "import sys\n"
        "from pipelines.cli import main\n"
        f"code = main(['data', 'check', {str(data)!r}, '--model', {str(smollm2_dir)!r}])\n"
        f"print('check:', {heavy})\n"
        "from pipelines.template_stats import LocalTemplate\n"
        "from stages.core.modeling import ModelConfig\n"
        "from stages.core.tokenizer_loading import load_tokenizer\n"
        f"tokenizer, _ = load_tokenizer({str(smollm2_dir)!r}, ModelConfig(), alone=True)\n"
        f"lengths = LocalTemplate(tokenizer).lengths([{{'messages': {CHAT!r}, 'source': 'x:1'}}])\n"
        f"print('alone:', {heavy}, lengths.loss)\n"
        "sys.exit(code)\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[3])
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ok: everything is usable" in run.stdout
    assert "check: []" in run.stdout, run.stdout
    assert "alone: ['transformers'] [" in run.stdout, run.stdout  # torch alone costs more than reading 100k rows


@pytest.mark.parametrize("alone", [False, True])
def test_a_model_directory_without_tokenizer_files_is_a_one_line_error_naming_it(model_copy, alone):
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (model_copy / name).unlink()
    with pytest.raises(LorelayError) as caught:
        load_tokenizer(str(model_copy), ModelConfig(name=str(model_copy)), alone=alone)
    assert caught.value.file == str(model_copy) and caught.value.field == "model.name"
    assert "cannot load a tokenizer from this directory" in str(caught.value)
