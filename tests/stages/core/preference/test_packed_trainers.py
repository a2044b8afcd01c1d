"""One training step of each packed preference trainer (the class the preference and reward stages run) gives
the loss and the LoRA gradients of TRL's own padded trainer, on multi-turn prompts cut at max_length (fp32).

Both trainers get the same model weights and the same examples in one micro-batch; ``training_step`` is
TRL's and transformers' own (forward, loss, backward), so only the batches and the loss code differ.
"""

from __future__ import annotations

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
