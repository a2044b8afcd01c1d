"""Model loading, adapters on and off the shared base, the shared-backbone score head, 4-bit on CPU."""

from __future__ import annotations

import shutil

import pytest
import torch

from stages.core.errors import LorelayError
from stages.core.modeling import (LoraSettings, ModelConfig, attach_adapter, detach_adapter, load_base,
                             parameter_storage, resolve_settings)
from stages.core.scoring import sequence_classifier

TINY_LORA = LoraSettings(r=4, alpha=8, dropout=0.0)


def test_auto_settings_on_cpu():
    quantization, dtype, attention, checkpointing = resolve_settings(ModelConfig(), "cpu")
    assert (quantization, dtype, attention, checkpointing) == ("none", torch.float32, "sdpa_packed", False)


def test_load_attach_detach_leaves_base_unchanged(tiny_model_dir, tmp_path):
    base = load_base(ModelConfig(name=str(tiny_model_dir)))
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    model = attach_adapter(base.model, TINY_LORA)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_()
    model.save_pretrained(tmp_path / "adapter")
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    bare = detach_adapter(model)
    assert bare is base.model
    assert not any("lora" in n for n, _ in bare.named_parameters())
    after = bare.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)

    # Continuing a saved adapter restores its weights exactly, whatever `lora` says.
    again = attach_adapter(base.model, LoraSettings(r=32), init_from=tmp_path / "adapter")
    for name, param in again.named_parameters():
        if "lora_" in name:
            assert torch.equal(param, saved[name]), name
    detach_adapter(again)


def test_score_head_shares_the_backbone(tiny_model_dir):
    base = load_base(ModelConfig(name=str(tiny_model_dir)))
    classifier = sequence_classifier(base.model, base.tokenizer)
    backbone = parameter_storage(base.model.model)
    assert backbone <= parameter_storage(classifier)
    extra = parameter_storage(classifier) - parameter_storage(base.model)
    assert len(extra) == 1  # the score head, nothing else
    ids = base.tokenizer("hello there", return_tensors="pt")
    assert classifier(**ids).logits.shape == (1, 1)


def test_pickle_only_checkpoint_is_refused(tiny_model_dir, tmp_path):
    target = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, target)
    for file in target.glob("*.safetensors"):
        file.rename(file.with_suffix(".bin"))
    with pytest.raises(LorelayError, match="pickle weights"):
        load_base(ModelConfig(name=str(target)))


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(LorelayError, match="no weight files"):
        load_base(ModelConfig(name=str(tmp_path)))


def test_4bit_path_trains_on_cpu(tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    base = load_base(ModelConfig(name=str(tiny_model_dir), quantization="4bit"), device="cpu")
    assert base.quantized and getattr(base.model, "is_loaded_in_4bit", False)
    model = attach_adapter(base.model, TINY_LORA)
    ids = base.tokenizer("a short sentence to learn", return_tensors="pt")["input_ids"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    detach_adapter(model)


def test_detach_restores_modules_to_save(tiny_model_dir):
    """A stage that trains embed_tokens in full must not leave its copy on the shared base."""
    base = load_base(ModelConfig(name=str(tiny_model_dir)))
    original = base.model.get_input_embeddings()
    before = original.weight.detach().clone()
    model = attach_adapter(base.model, LoraSettings(r=4, alpha=8, modules_to_save=["embed_tokens"]))
    for name, param in model.named_parameters():
        if "modules_to_save" in name:
            param.data.add_(1.0)
    bare = detach_adapter(model)
    assert bare.get_input_embeddings() is original
    assert torch.equal(bare.get_input_embeddings().weight, before)
