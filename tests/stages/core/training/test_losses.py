"""The compact loss (LM head on labelled positions only) equals the full loss, in value and in gradients."""

from __future__ import annotations

import pytest
import torch

from stages.core import compat
from stages.core.modeling import LoraSettings, ModelConfig, attach_adapter, detach_adapter, load_base
from stages.core.training.losses import compact_lm_loss, compact_loss_applies, label_positions, sft_trainer_class

CHATS = [
    [{"role": "user", "content": "Route this ticket: my invoice is wrong"}, {"role": "assistant", "content": "billing"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is my parcel?"},
     {"role": "assistant", "content": "It ships tomorrow."}, {"role": "user", "content": "Thanks"},
     {"role": "assistant", "content": "You are welcome."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}],
]


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return load_base(ModelConfig(name=str(tiny_model_dir)))


@pytest.fixture()
def model(base):
    # lora_B starts at zero; random B makes the adapter matter, so its gradients are a real test.
    peft_model = attach_adapter(base.model, LoraSettings(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(1)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(std=0.05)
    peft_model.train()
    yield peft_model
    detach_adapter(peft_model)


def features(tokenizer) -> list[dict]:
    from stages.core.data import encode_record

    rows = []
    for messages in CHATS:
        ids, mask = encode_record(tokenizer, {"messages": messages})
        rows.append({"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask)]})
    return rows


def batch(tokenizer, padding_free: bool) -> dict:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=padding_free)
    return collator(features(tokenizer))


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("padding_free", [True, False], ids=["padding_free", "padded"])
@pytest.mark.parametrize("num_items", [None, 17], ids=["mean", "num_items_in_batch"])
def test_compact_loss_and_gradients_equal_the_full_loss(base, model, padding_free, num_items):
    inputs = batch(base.tokenizer, padding_free)
    labels = inputs.pop("labels")

    model.zero_grad()
    full = model(**inputs, labels=labels, num_items_in_batch=num_items).loss
    full.backward()
    expected = lora_grads(model)

    model.zero_grad()
    compact = compact_lm_loss(model, inputs, labels, num_items)
    compact.loss.backward()
    got = lora_grads(model)

    torch.testing.assert_close(compact.loss, full, rtol=1e-5, atol=1e-6)
    assert expected.keys() == got.keys() and expected
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert int(compact.labelled) == int((labels[:, 1:] != -100).sum())


def test_label_positions_never_cross_a_sample_boundary(base):
    inputs = batch(base.tokenizer, padding_free=True)
    keep, targets = label_positions(inputs["labels"])
    starts = (inputs["position_ids"][0] == 0).nonzero().flatten()
    # the position before each sample's first token predicts nothing (that label is -100)
    assert not keep[0, starts[1:] - 1].any()
    assert targets.numel() == keep.sum() and (targets != -100).all()


def sft_trainer(trainer_class, base, model, tmp_path, **overrides):
    from datasets import Dataset
    from trl import SFTConfig

    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], padding_free=True,
                     max_length=None, gradient_checkpointing=False, remove_unused_columns=False, **overrides)
    return trainer_class(model=model, args=args, train_dataset=Dataset.from_list(features(base.tokenizer)),
                         processing_class=base.tokenizer)


def test_lorelay_trainer_matches_trl_loss_and_logged_metrics(base, model, tmp_path):
    from trl import SFTTrainer

    inputs = batch(base.tokenizer, padding_free=True)
    results = {}
    for name, trainer_class in (("trl", SFTTrainer), ("lorelay", sft_trainer_class())):
        trainer = sft_trainer(trainer_class, base, model, tmp_path / name)
        model.zero_grad()
        loss = trainer.compute_loss(model, dict(inputs))
        loss.backward()
        results[name] = (loss.detach(), lora_grads(model), {k: v[-1] for k, v in compat.trl_metrics(trainer, "train").items()})
        if name == "lorelay":
            assert compact_loss_applies(trainer, model, inputs)
    (trl_loss, trl_grads, trl_metrics), (our_loss, our_grads, our_metrics) = results["trl"], results["lorelay"]
    torch.testing.assert_close(our_loss, trl_loss, rtol=1e-5, atol=1e-6)
    for name in trl_grads:
        torch.testing.assert_close(our_grads[name], trl_grads[name], rtol=1e-4, atol=1e-7)
    assert our_metrics.keys() == trl_metrics.keys()
    for key in trl_metrics:
        assert our_metrics[key] == pytest.approx(trl_metrics[key], rel=1e-4, abs=1e-6), key


def test_other_losses_fall_back_to_trl(base, model, tmp_path):
    inputs = batch(base.tokenizer, padding_free=True)
    trainer = sft_trainer(sft_trainer_class(), base, model, tmp_path, loss_type="dft")
    assert not compact_loss_applies(trainer, model, inputs)
    assert torch.isfinite(trainer.compute_loss(model, dict(inputs)))
