"""Security: remote code runs only when a config turns it on (with a warning); weights are read and
written as safetensors, a pickle adapter is refused unless allowed; stage outputs are checked against
their checksums before use; data and configs are parsed, never executed."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages.core.config import load_config
from stages.core.data import DatasetSpec, load_records
from stages.core.errors import ConfigError, DataError, LorelayError
from stages.core.modeling import LoraSettings, ModelConfig, attach_adapter, detach_adapter, load_base
from stages.sft import SFTConfig
from stages.core.training import StageOutput
from tests.reliability.helpers import base  # noqa: F401

LORA = LoraSettings(r=4, alpha=8, dropout=0.0)


@pytest.fixture
def from_pretrained_calls(monkeypatch):
    calls = []
    for cls in (AutoModelForCausalLM, AutoTokenizer):
        original = cls.from_pretrained

        def spy(*args, _original=original, _name=cls.__name__, **kwargs):
            calls.append((_name, kwargs.get("trust_remote_code")))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    return calls


def test_remote_code_is_off_by_default(tiny_model_dir, from_pretrained_calls):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_base(ModelConfig(name=str(tiny_model_dir)))
    assert sorted(from_pretrained_calls) == [("AutoModelForCausalLM", False), ("AutoTokenizer", False)]
    assert not [w for w in caught if "trust_remote_code" in str(w.message)]


def test_remote_code_only_when_enabled_and_with_a_warning(tiny_model_dir, from_pretrained_calls):
    with pytest.warns(UserWarning, match="trust_remote_code is on: code from .* will run on this machine"):
        load_base(ModelConfig(name=str(tiny_model_dir), trust_remote_code=True))
    assert sorted(from_pretrained_calls) == [("AutoModelForCausalLM", True), ("AutoTokenizer", True)]


def saved_adapter(base, directory: Path) -> dict:
    model = attach_adapter(base.model, LORA)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_()
    model.save_pretrained(directory)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    detach_adapter(model)
    return weights


def test_a_pickle_only_adapter_is_refused_unless_allowed(tmp_path, base):
    from safetensors.torch import load_file

    weights = saved_adapter(base, tmp_path / "adapter")
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    torch.save(tensors, tmp_path / "adapter" / "adapter_model.bin")
    (tmp_path / "adapter" / "adapter_model.safetensors").unlink()

    with pytest.raises(LorelayError, match="only pickle weights \\(adapter_model.bin\\)") as info:
        attach_adapter(base.model, LORA, init_from=tmp_path / "adapter")
    assert "allow_pickle_weights" in str(info.value)
    assert not any("lora" in n for n, _ in base.model.named_parameters())  # refused before wrapping

    model = attach_adapter(base.model, LORA, init_from=tmp_path / "adapter", allow_pickle_weights=True)
    for name, param in model.named_parameters():
        if "lora_" in name:
            assert torch.equal(param, weights[name]), name
    detach_adapter(model)


def test_a_stage_output_whose_files_changed_is_refused_as_an_adapter(tmp_path, base):
    from types import SimpleNamespace

    output = StageOutput(tmp_path / "sft", stage="sft")
    saved_adapter(base, output.staging)
    fake_base = SimpleNamespace(config=SimpleNamespace(name="tiny"), path="tiny", fingerprint="x",
                                quantization="none", dtype="float32", attn_implementation="sdpa",
                                template_source="tokenizer")
    output.commit(config={}, base=fake_base)
    detach_adapter(attach_adapter(base.model, LORA, init_from=tmp_path / "sft"))  # whole: loads

    with open(tmp_path / "sft" / "adapter_config.json", "a") as handle:
        handle.write(" ")
    with pytest.raises(LorelayError, match="checksum mismatch for adapter_config.json"):
        attach_adapter(base.model, LORA, init_from=tmp_path / "sft")


class Payload:
    """Unpickling this would create ``marker``: proof that a file was executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.mark.parametrize("name", ["data.pkl", "data.parquet", "data.json", "data.jsonl"])
def test_a_pickle_posing_as_data_is_never_unpickled(tmp_path, name):
    marker = tmp_path / "executed"
    (tmp_path / name).write_bytes(pickle.dumps([{"text": Payload(marker)}]))
    with pytest.raises(DataError):
        load_records(DatasetSpec(str(tmp_path / name)), kind="text")
    assert not marker.exists()


def test_code_in_data_stays_text(tmp_path):
    marker = tmp_path / "executed"
    code = f"__import__('pathlib').Path('{marker}').touch()"
    (tmp_path / "data.jsonl").write_text(f'{{"text": "{code}"}}\n')
    assert load_records(DatasetSpec(str(tmp_path / "data.jsonl")), kind="text").records[0]["text"] == code
    assert not marker.exists()


def test_python_tags_in_a_config_are_refused_not_run(tmp_path):
    marker = tmp_path / "executed"
    config = tmp_path / "sft.yaml"
    config.write_text(f"training: !!python/object/apply:pathlib.Path.touch ['{marker}']\n")
    with pytest.raises(ConfigError, match="sft.yaml:1: invalid YAML"):
        load_config(SFTConfig, config)
    assert not marker.exists()
