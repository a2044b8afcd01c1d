"""One training step of each packed preference trainer (the class the preference and reward stages run) gives
the loss and the LoRA gradients of TRL's own padded trainer, on multi-turn prompts cut at max_length (fp32).

Both trainers get the same model weights and the same examples in one micro-batch; ``training_step`` is
TRL's and transformers' own (forward, loss, backward), so only the batches and the loss code differ.
"""

from __future__ import annotations

import os

import pytest
import torch

from stages.core import compat
from tests.stages.core.preference.test_packed_equals_padded import ATOL, CONVERSATIONS, lora, lora_grads


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: a second OpenMP thread only waits (see tests/stages/test_dpo.py)
    yield
    torch.set_num_threads(threads)


def pair_rows() -> list[dict]:
    """The stage's trainer rows (``stages.dpo.trainer_row``): conversational prompt, one-message replies."""
    return [{"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
             "rejected": [{"role": "assistant", "content": rejected}]} for prompt, chosen, rejected in CONVERSATIONS]


def causal_lm(tiny_model_dir, **lora_settings):
    from transformers import AutoModelForCausalLM

    return lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                     attn_implementation="sdpa"), **lora_settings)


def common_args(tmp_path, batch_size: int) -> dict:
    return dict(output_dir=str(tmp_path), per_device_train_batch_size=batch_size, use_cpu=True, bf16=False,
                report_to=[], remove_unused_columns=False, disable_dropout=True, seed=0, logging_steps=1)


def one_step(trainer):
    """(loss, LoRA gradients) of the trainer's ``compute_loss`` and a backward pass on its first (only)
    micro-batch, as its training step takes them."""
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach(), lora_grads(trainer.model)


def assert_same_step(packed, padded):
    (packed_loss, packed_grads), (padded_loss, padded_grads) = packed, padded
    torch.testing.assert_close(packed_loss, padded_loss, atol=ATOL, rtol=0)
    assert packed_grads.keys() == padded_grads.keys() and packed_grads
    for name, grad in packed_grads.items():
        assert grad.abs().sum() > 0, f"{name} got no gradient"
        torch.testing.assert_close(grad, padded_grads[name], atol=ATOL, rtol=0, msg=f"gradient of {name}")


def test_orpo_step_equals_trls_padded_orpo(tiny_model_dir, tokenizer, tmp_path):
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    rows = Dataset.from_list(pair_rows())
    max_length = 72  # the last pair's 69-token prompt leaves 3 tokens of its reply (TRL cuts replies only)
    runs = {}
    for name, trainer_class in (("packed", compat.packed_orpo_trainer()), ("padded", ORPOTrainer)):
        args = ORPOConfig(**common_args(tmp_path / name, len(rows)), beta=0.25, max_length=max_length)
        trainer = trainer_class(model=causal_lm(tiny_model_dir), args=args, train_dataset=rows,
                                processing_class=tokenizer)
        runs[name] = one_step(trainer)
        if name == "packed":
            assert trainer.batching.describe() == "packed, prompt shared"
            lengths = [len(ids) for ids in trainer.train_dataset["chosen_input_ids"]]
            assert max(lengths) == max_length and min(lengths) < max_length, lengths
            turns = [len(row["prompt"]) for row in pair_rows()]
            assert max(turns) > 1
    assert_same_step(runs["packed"], runs["padded"])


def sequence_classifier(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)  # the score head is new: the same one for both trainers
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1, dtype=torch.float32,
                                                               attn_implementation="sdpa")
    return lora(model, task_type="SEQ_CLS")


@pytest.mark.parametrize("truncation_side", ["left", "right"])
def test_reward_step_equals_trls_padded_reward_trainer(tiny_model_dir, tokenizer, tmp_path, truncation_side):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from stages.reward import tokenize_pairs

    records = [{**row, "margin": 0.5 * i, "source": f"pairs.jsonl:{i + 1}"} for i, row in enumerate(pair_rows())]
    columns, report = tokenize_pairs(tokenizer, records, max_length=72, truncation_side=truncation_side,
                                     with_margin=True)
    assert report.kept == 3 and report.truncated >= 1  # the stage's own tokenization and cut
    rows = Dataset.from_dict(columns)
    runs = {}
    for name, trainer_class in (("packed", compat.packed_reward_trainer()), ("padded", RewardTrainer)):
        args = RewardConfig(**common_args(tmp_path / name, len(rows)), max_length=None,
                            center_rewards_coefficient=0.01)
        trainer = trainer_class(model=sequence_classifier(tiny_model_dir), args=args, train_dataset=rows,
                                processing_class=tokenizer)
        runs[name] = one_step(trainer)
        if name == "packed":
            assert trainer.batching.describe() == "packed, prompt shared"
            batch = trainer.data_collator([rows[i] for i in range(len(rows))])
            sides = sum(len(ids) for key in ("chosen_ids", "rejected_ids") for ids in columns[key])
            shared = sum(len(os.path.commonprefix(pair)) for pair in zip(columns["chosen_ids"], columns["rejected_ids"]))
            assert shared > 0 and batch["input_ids"].shape[1] <= sides - shared  # each pair's common start once
    assert_same_step(runs["packed"], runs["padded"])


def test_reward_rows_read_each_score_where_the_classifier_pools():
    """A sequence classifier pools at the last token that is not the pad token: trailing pad tokens are left
    out of the row, and the pair's common start is there once."""
    from stages.core.preference.reward_step import PackedRewardCollator

    batch = PackedRewardCollator(pad_token_id=0)([{"chosen_ids": [5, 6, 7, 0, 0], "rejected_ids": [5, 6, 8, 9]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 2, 3]]
    assert batch["sequence_ends"].tolist() == [2, 4]


def kto_rows() -> list[dict]:
    """The stage's KTO rows: each pair split into a desirable and an undesirable example."""
    return [{"prompt": row["prompt"], "completion": row[side], "label": side == "chosen"}
            for row in pair_rows() for side in ("chosen", "rejected")]


def nudge(model, adapter: str) -> None:
    """Move one of the adapters TRL holds (the trained ``default``, or its frozen copy ``ref``) off the other,
    by the same amount for both trainers."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if f".{adapter}." in name and "lora_B" in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)


@pytest.mark.parametrize("loss_type, precompute", [("kto", False), ("kto", True), ("apo_zero_unpaired", False)])
def test_kto_step_equals_trls_padded_kto(tiny_model_dir, tokenizer, tmp_path, loss_type, precompute):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    rows = Dataset.from_list(kto_rows())
    max_length = 72  # the 69-token prompt keeps 3 completion tokens; its mismatched KL completions are cut too
    runs = {}
    for name, trainer_class in (("packed", compat.packed_kto_trainer()), ("padded", KTOTrainer)):
        args = KTOConfig(**common_args(tmp_path / name, len(rows)), beta=0.5, max_length=max_length,
                         loss_type=loss_type, desirable_weight=1.5, precompute_ref_log_probs=precompute)
        trainer = trainer_class(model=causal_lm(tiny_model_dir), args=args, train_dataset=rows,
                                processing_class=tokenizer)
        assert compat.has_reference_adapter(trainer.model)
        # A random reference scores text lower than the untouched policy: the KL estimate is positive. Precomputed
        # reference log-probs are fixed already: the policy moves instead (the estimate, negative, clamps to 0).
        nudge(trainer.model, "default" if precompute else compat.TRL_REFERENCE_ADAPTER)
        runs[name] = one_step(trainer)
        if name == "packed":
            assert trainer.batching.layout == "packed, prompt repeated" and "KL completion" in trainer.batching.reason
            assert len(trainer.train_dataset) == len(rows)  # no prompt fills max_length
            if loss_type == "kto":
                kl = trainer.train_dataset[compat.KTO_KL_COMPLETION_IDS]
                assert kl[1:] == trainer.train_dataset[compat.KTO_COMPLETION_IDS][:-1]
            assert (compat.trl_metrics(trainer, "train")["kl"][-1] > 0) == (loss_type == "kto" and not precompute)
    assert_same_step(runs["packed"], runs["padded"])
