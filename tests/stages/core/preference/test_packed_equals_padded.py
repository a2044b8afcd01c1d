"""Packed, prompt-sharing preference rows give the padded path's log-probs, losses and LoRA gradients.

The padded path is what TRL runs: every sequence (prompt + reply) in its own right-padded row, the LM head
on every position. Multi-turn prompts, replies of different lengths and truncation at max_length.
"""

from __future__ import annotations

import pytest
import torch

from stages.core.preference import collate, losses
from stages.core.preference.logps import sequence_logps, sequence_scores

ATOL = 1e-5
# Summed log-probs of a reply are ~ -100..-500 in fp32: the two paths add the same token values in a different
# order, so their sums agree to a few units in the last place (1e-6 relative), each token to 1e-5 absolute.
SUM_RTOL = 1e-6

CONVERSATIONS = [
    ([{"role": "system", "content": "You triage bug reports."}, {"role": "user", "content": "App crashes on start."},
      {"role": "assistant", "content": "Which version?"}, {"role": "user", "content": "2.1 on Android 14."}],
     "Likely the startup migration; severity high.", "ok"),
    ([{"role": "user", "content": "Summarise: the login button is misaligned on the settings page."}],
     "Cosmetic: login button misaligned in settings.", "The button is broken and the whole app is unusable now."),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
      {"role": "user", "content": "Export to CSV drops the last row of every report, every time, since 3.0."}],
     "Data loss in CSV export since 3.0: off-by-one in the row loop; severity high, regression.",
     "Please reinstall."),
]


def ids(tokenizer, messages, **kwargs):
    text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenized(tokenizer):
    examples = []
    for prompt, chosen, rejected in CONVERSATIONS:
        prompt_ids = ids(tokenizer, prompt, add_generation_prompt=True)
        example = {"prompt_ids": prompt_ids}
        for key, reply in (("chosen_ids", chosen), ("rejected_ids", rejected)):
            full = ids(tokenizer, prompt + [{"role": "assistant", "content": reply}])
            assert full[:len(prompt_ids)] == prompt_ids
            example[key] = full[len(prompt_ids):]
        examples.append(example)
    return examples


@pytest.fixture(scope="module")
def examples(tokenizer):
    return tokenized(tokenizer)


def lora(model, **extra):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **extra)
    return get_peft_model(model, config)


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    return lora(model)


def padded_logps(model, sequences):
    """Summed completion log-probs of (tokens, scored) sequences, each in its own right-padded row."""
    longest = max(len(tokens) for tokens, _ in sequences)
    ids = torch.zeros(len(sequences), longest, dtype=torch.long)
    attention = torch.zeros_like(ids)
    scored = torch.zeros_like(ids, dtype=torch.bool)
    for i, (tokens, mask) in enumerate(sequences):
        ids[i, :len(tokens)] = torch.tensor(tokens)
        attention[i, :len(tokens)] = 1
        scored[i, :len(tokens)] = torch.tensor(mask)
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
    token_logps = torch.log_softmax(logits, -1).gather(2, ids[:, 1:, None])[..., 0]
    keep = scored[:, 1:]
    return (token_logps * keep).sum(1), keep.sum(1)


def cut(prompt, completion, max_length, mode="keep_start", score_prompt=False):
    """Prompt + completion truncated by slicing the whole sequence, as TRL's collators do."""
    tokens = prompt + completion
    mask = [score_prompt] * len(prompt) + [True] * len(completion)
    if max_length is not None and len(tokens) > max_length:
        keep = slice(None, max_length) if mode == "keep_start" else slice(-max_length, None)
        tokens, mask = tokens[keep], mask[keep]
    return tokens, mask


def lora_grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def assert_same_grads(model, loss_packed, loss_padded):
    model.zero_grad()
    loss_packed.backward()
    packed = lora_grads(model)
    model.zero_grad()
    loss_padded.backward()
    padded = lora_grads(model)
    model.zero_grad()
    assert packed.keys() == padded.keys() and len(packed) > 0
    for name in packed:
        torch.testing.assert_close(packed[name], padded[name], atol=ATOL, rtol=0, msg=f"gradient of {name}")


@pytest.mark.parametrize("max_length,mode", [(None, "keep_start"), (60, "keep_start"), (60, "keep_end")])
def test_dpo_logps_losses_and_grads_equal_trls_padded_batches(policy, examples, max_length, mode):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    kept = [e for e in examples if mode == "keep_end" or max_length is None or len(e["prompt_ids"]) < max_length]
    packed = collate.PackedPairCollator(max_length=max_length, truncation_mode=mode)(kept)
    mine = sequence_logps(policy, packed)
    # TRL's own padded collator, and its per-sequence sums of completion log-probs (chosen first, then rejected)
    padded = DataCollatorForPreference(pad_token_id=0, max_length=max_length, truncation_mode=mode)(kept)
    logits = policy(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits[:, :-1]
    token_logps = torch.log_softmax(logits.float(), -1).gather(2, padded["input_ids"][:, 1:, None])[..., 0]
    theirs = (token_logps * padded["completion_mask"][:, 1:]).sum(1)
    torch.testing.assert_close(mine.logps, theirs, atol=ATOL, rtol=SUM_RTOL)
    assert mine.tokens.tolist() == padded["completion_mask"][:, 1:].sum(1).tolist()
    if mode == "keep_start":  # the prompt is intact, so each pair's replies share it: one row, prompts once
        prompts = sum(len(e["prompt_ids"]) for e in kept)
        assert packed["input_ids"].shape[1] == padded["attention_mask"].sum() - prompts

    n = len(kept)
    # a reference near the policy, so that every loss is of order 1, as in training
    ref_chosen = theirs[:n].detach() + torch.linspace(-2, 1, n)
    ref_rejected = theirs[n:].detach() + torch.linspace(1, -1, n)
    for loss_types in (["sigmoid"], ["ipo"], ["sigmoid", "bco_pair", "sft"], ["apo_zero"], ["sigmoid_norm"]):
        def loss(logps, tokens):
            return losses.dpo_loss(losses.PairLogps.split(logps, tokens), ref_chosen, ref_rejected, beta=0.1,
                                   loss_types=loss_types)
        counts = padded["completion_mask"][:, 1:].sum(1)
        torch.testing.assert_close(loss(mine.logps, mine.tokens), loss(theirs, counts), atol=ATOL, rtol=0)
    assert_same_grads(policy, losses.dpo_loss(losses.PairLogps.split(mine.logps, mine.tokens), ref_chosen,
                                              ref_rejected, beta=0.1),
                      losses.dpo_loss(losses.PairLogps.split(theirs, counts), ref_chosen, ref_rejected, beta=0.1))


def test_unshared_rows_and_rows_run_in_pieces_equal_shared_rows(policy, examples):
    """The fallback for kernels without a mask (one segment per sequence), and a row run through the decoder
    one group at a time (as long rows are), compute the same values."""
    shared = collate.pack(collate.pair_groups(examples, share_prompt=True))
    unshared = collate.pack(collate.pair_groups(examples, share_prompt=False))
    assert unshared["input_ids"].shape[1] > shared["input_ids"].shape[1]
    whole = sequence_logps(policy, shared).logps
    torch.testing.assert_close(whole, sequence_logps(policy, unshared).logps, atol=ATOL, rtol=SUM_RTOL)
    torch.testing.assert_close(whole, sequence_logps(policy, shared, piece_tokens=1).logps, atol=ATOL, rtol=SUM_RTOL)


def test_orpo_loss_and_grads_equal_padded(policy, examples):
    max_length = 70
    kept = [e for e in examples if len(e["prompt_ids"]) < max_length]
    packed = collate.pack(collate.pair_groups(kept, max_length=max_length, score_prompt=True))
    n = len(kept)
    mine = sequence_logps(policy, packed)
    pair = losses.PairLogps.split(mine.logps[:2 * n], mine.tokens[:2 * n])
    loss_packed, _, _ = losses.orpo_loss(pair, mine.logps[2 * n:], mine.tokens[2 * n:], beta=0.1)
    # padded: ORPO's NLL runs over prompt + chosen; its odds over the replies alone
    sequences = [cut(e["prompt_ids"], e[key], max_length) for key in ("chosen_ids", "rejected_ids") for e in kept]
    replies, counts = padded_logps(policy, sequences)
    whole, whole_counts = padded_logps(policy, [cut(e["prompt_ids"], e["chosen_ids"], max_length, score_prompt=True)
                                                for e in kept])
    torch.testing.assert_close(mine.logps[:2 * n], replies, atol=ATOL, rtol=SUM_RTOL)
    chosen_nll = -whole.sum() / whole_counts.sum()
    _, odds, _ = losses.orpo_loss(losses.PairLogps.split(replies, counts), torch.zeros(n), torch.zeros(n), beta=0.1)
    loss_padded = chosen_nll - (0.1 * torch.nn.functional.logsigmoid(odds)).mean()
    torch.testing.assert_close(loss_packed, loss_padded, atol=ATOL, rtol=0)
    assert_same_grads(policy, loss_packed, loss_padded)


def test_kto_loss_and_grads_equal_padded(policy, examples):
    max_length = 64
    rows = [{"prompt_ids": e["prompt_ids"], "completion_ids": e[key]}
            for e in examples for key in ("chosen_ids", "rejected_ids")]
    rows = [r for r in rows if len(r["prompt_ids"]) < max_length]
    for i, row in enumerate(rows):  # TRL's KL completions: completions cycled by one within the batch
        row["KL_completion_ids"] = rows[(i + 1) % len(rows)]["completion_ids"]
    desirable = torch.tensor([i % 2 == 0 for i in range(len(rows))])
    n = len(rows)
    packed = collate.pack(collate.unpaired_groups(rows, max_length=max_length, extra_key="KL_completion_ids"))
    mine = sequence_logps(policy, packed).logps
    padded, _ = padded_logps(policy, [cut(r["prompt_ids"], r[key], max_length)
                                      for key in ("completion_ids", "KL_completion_ids") for r in rows])
    torch.testing.assert_close(mine, padded, atol=ATOL, rtol=SUM_RTOL)
    ref = padded[:n].detach() + torch.linspace(-1, 1, n)

    def loss(values):
        return losses.kto_loss(values[:n], ref, desirable, values[n:], padded[n:].detach() - 0.5, beta=0.1, desirable_weight=1.5)
    torch.testing.assert_close(loss(mine), loss(padded), atol=ATOL, rtol=0)
    assert_same_grads(policy, loss(mine), loss(padded))


def test_reward_pair_loss_and_grads_equal_padded(tiny_model_dir, examples):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1, dtype=torch.float32,
                                                               attn_implementation="sdpa")
    unused = model.config.vocab_size - 1  # a padding id no sample contains, so the model pools the true last token
    model.config.pad_token_id = unused
    model = lora(model, task_type="SEQ_CLS")
    max_length = 60
    pairs = [e for e in examples if len(e["prompt_ids"]) < max_length]
    packed = collate.pack(collate.pair_groups(pairs, max_length=max_length))
    mine = sequence_scores(model, packed)
    sequences = [cut(e["prompt_ids"], e[key], max_length)[0] for key in ("chosen_ids", "rejected_ids") for e in pairs]
    longest = max(map(len, sequences))
    ids = torch.full((len(sequences), longest), unused)
    for i, tokens in enumerate(sequences):
        ids[i, :len(tokens)] = torch.tensor(tokens)
    theirs = model(input_ids=ids, attention_mask=(ids != unused).long()).logits[:, 0].float()
    torch.testing.assert_close(mine, theirs, atol=ATOL, rtol=0)
    n = len(pairs)
    margin = torch.full((n,), 0.25)

    def loss(scores):
        return losses.reward_pair_loss(scores[:n], scores[n:], margin, center_rewards_coefficient=0.01)
    torch.testing.assert_close(loss(mine), loss(theirs), atol=ATOL, rtol=0)
    assert_same_grads(model, loss(mine), loss(theirs))


def test_block_mask_keeps_replies_apart():
    groups = [collate.Group([1, 2], [collate.Reply([3, 4], [True, True], 0), collate.Reply([5], [True], 1)])]
    batch = collate.pack(groups)
    mask = batch["attention_mask"][0, 0]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2]]
    assert mask[4].tolist() == [True, True, False, False, True]       # rejected sees the prompt, not chosen
    assert mask[3].tolist() == [True, True, True, True, False]
    # the prompt's last hidden state predicts both replies' first tokens
    assert batch["score_positions"].tolist() == [1, 2, 1]
    assert batch["score_targets"].tolist() == [3, 4, 5]
    assert batch["sequence_ends"].tolist() == [3, 4]
