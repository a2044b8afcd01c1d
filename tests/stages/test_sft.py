"""The SFT stage end to end on the tiny model: loss falls, outputs round-trip, packing stays exact."""

from __future__ import annotations

import json

import pytest
import torch

from stages.core.config import load_config
from stages.core.modeling import ModelConfig, attach_adapter, detach_adapter, load_base
from stages.sft import SFTConfig, run
from stages.core.training import verify_output
from tests.conftest import write_jsonl

CHATS = [
    {"messages": [{"role": "user", "content": f"Route ticket {i}: my invoice is wrong"},
                  {"role": "assistant", "content": "Queue: billing"}]}
    for i in range(24)
] + [
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": f"Route ticket {i}: the parcel never arrived"},
                  {"role": "assistant", "content": "Queue: shipping"}]}
    for i in range(24)
]


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return load_base(ModelConfig(name=str(tiny_model_dir)))


def sft_config(tmp_path, data_file, *overrides) -> SFTConfig:
    return load_config(SFTConfig, None, [
        f"data.datasets=[{{path: {data_file}}}]", "data.eval_ratio=0.2", "data.sample_prompts=2",
        f"training.output_dir={tmp_path / 'sft'}", "training.max_steps=12", "training.batch_size=4",
        "training.learning_rate=3e-2", "training.logging_steps=1", "training.warmup_ratio=0.0",
        "lora.r=8", "lora.alpha=16", "lora.dropout=0.0", "sample_max_new_tokens=4", *overrides])


def test_sft_lowers_loss_and_writes_a_loadable_adapter(tmp_path, base):
    data_file = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    output = run(sft_config(tmp_path, data_file), base)

    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json",
                 "chat_template.jinja", "metrics.json", "manifest.json", "samples.json"):
        assert (output / name).exists(), name
    assert not output.with_name("sft.partial").exists()
    manifest = verify_output(output)
    assert manifest["stage"] == "sft" and manifest["base_model"]["fingerprint"] == base.fingerprint
    assert str(data_file) in json.dumps(manifest["data"])

    metrics = json.loads((output / "metrics.json").read_text())
    losses = [e["loss"] for e in metrics["log_history"] if "loss" in e]
    assert len(losses) >= 10 and losses[-1] < 0.5 * losses[0], losses
    assert metrics["eval_perplexity"] is not None
    assert metrics["data"]["train"]["loss_tokens"] < metrics["data"]["train"]["tokens"]

    # The saved adapter loads back onto the base and changes what the model says.
    prompt = base.tokenizer.apply_chat_template([{"role": "user", "content": "Route ticket 99: my invoice is wrong"}],
                                                add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        plain = base.model(**prompt).logits[0, -1]
    model = attach_adapter(base.model, sft_config(tmp_path, data_file).lora, init_from=output)
    with torch.no_grad():
        tuned = model(**prompt).logits[0, -1]
    detach_adapter(model)
    assert not torch.allclose(plain, tuned)
    expected = base.tokenizer.encode("Queue", add_special_tokens=False)[0]
    assert tuned.argmax().item() == expected


def test_each_trainable_parameter_changes(tmp_path, base):
    data_file = write_jsonl(tmp_path / "chats.jsonl", CHATS[:16])
    output = run(sft_config(tmp_path, data_file, "training.max_steps=3", "data.eval_ratio=0.0"), base)
    from safetensors.torch import load_file

    trained = load_file(output / "adapter_model.safetensors")
    # lora_B starts at zero; each one must have moved.
    untouched = [name for name, tensor in trained.items() if "lora_B" in name and torch.count_nonzero(tensor) == 0]
    assert not untouched, f"parameters that did not train: {untouched[:3]}"


def test_packed_batch_equals_separate_samples(base):
    """Padding-free batches restart position ids per sample, so samples never see each other."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tokenizer = base.tokenizer
    a = tokenizer("first sample with some words", add_special_tokens=False)["input_ids"]
    b = tokenizer("second one", add_special_tokens=False)["input_ids"]
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    batch = collator([{"input_ids": a}, {"input_ids": b}])
    assert batch["position_ids"][0].tolist() == list(range(len(a))) + list(range(len(b)))
    assert "attention_mask" not in batch
    model = base.model.eval()
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        alone_a = model(input_ids=torch.tensor([a])).logits[0]
        alone_b = model(input_ids=torch.tensor([b])).logits[0]
    torch.testing.assert_close(packed[: len(a)], alone_a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed[len(a):], alone_b, atol=1e-5, rtol=1e-4)


def test_unknown_key_in_sft_config_is_refused(tmp_path):
    from stages.core.errors import ConfigError

    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        load_config(SFTConfig, None, ["data.datasets=[{path: x.jsonl}]", "training.learnign_rate=1"])
