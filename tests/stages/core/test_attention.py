"""``sdpa_packed``: the same attention as sdpa, one sdpa call per independent block of a packed row."""

from __future__ import annotations

import pytest
import torch

from stages.core import attention
from stages.core.attention import independent_blocks


def causal(n: int) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool).tril()


def block_diagonal(*blocks: torch.Tensor) -> torch.Tensor:
    return torch.block_diag(*[b.to(torch.uint8) for b in blocks]).bool()


def test_blocks_of_a_packed_causal_mask():
    assert independent_blocks(block_diagonal(causal(3), causal(1), causal(4))) == [
        (0, 3, True), (3, 4, True), (4, 8, True)]


def test_a_block_with_its_own_pattern_is_one_block_and_not_causal():
    shared = causal(5)
    shared[4, 2:4] = False  # a second reply (position 4) skips its sibling (2, 3) but sees the prompt (0, 1)
    assert independent_blocks(block_diagonal(shared, causal(2))) == [(0, 5, False), (5, 7, True)]


def test_attention_across_blocks_joins_them():
    mask = block_diagonal(causal(3), causal(3))
    mask[4, 1] = True  # one query of the second sequence sees a key of the first
    assert independent_blocks(mask) == [(0, 6, False)]


def test_a_query_that_attends_nothing_gives_no_blocks():
    mask = block_diagonal(causal(3), causal(3))
    mask[4] = False
    assert independent_blocks(mask) is None


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    """The tiny Llama under sdpa and under sdpa_packed, with the same random LoRA adapter (B nonzero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    attention.register()
    loaded = {}
    for kernel in ("sdpa", attention.NAME):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=kernel)
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                                                 init_lora_weights=False))
        loaded[kernel] = model
    loaded[attention.NAME].load_state_dict(loaded["sdpa"].state_dict())
    return loaded


@pytest.fixture
def sdpa_calls(monkeypatch):
    """The (query length, mask given) of every sdpa call the packed kernel makes (the plain sdpa model calls the
    function registered at import, not this module attribute)."""
    from transformers.integrations import sdpa_attention

    calls = []
    real = sdpa_attention.sdpa_attention_forward

    def spy(module, query, key, value, attention_mask, **kwargs):
        calls.append((query.shape[2], attention_mask is not None))
        return real(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", spy)
    return calls


def logits_and_grads(model, **inputs):
    model.zero_grad()
    logits = model(**inputs, use_cache=False).logits
    (logits.float().pow(2).mean()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


def assert_same(models, **inputs):
    logits, grads = logits_and_grads(models["sdpa"], **inputs)
    packed_logits, packed_grads = logits_and_grads(models[attention.NAME], **inputs)
    torch.testing.assert_close(packed_logits, logits, atol=1e-5, rtol=1e-5)
    assert grads.keys() == packed_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(packed_grads[name], grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_padding_free_row_matches_sdpa_one_call_per_sequence(models, sdpa_calls):
    lengths = [5, 9, 3, 12]
    torch.manual_seed(1)
    input_ids = torch.randint(0, 1000, (1, sum(lengths)))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    assert_same(models, input_ids=input_ids, position_ids=position_ids)
    layers = models["sdpa"].config.num_hidden_layers
    assert sdpa_calls == [(n, False) for n in lengths] * layers  # causal per sequence, no mask


def test_rows_packed_differently_in_one_batch(models, sdpa_calls):
    """Continued pretraining's layout: several rows, each with its own documents."""
    torch.manual_seed(2)
    input_ids = torch.randint(0, 1000, (2, 12))
    position_ids = torch.stack([torch.cat([torch.arange(4), torch.arange(8)]), torch.arange(12)])
    assert_same(models, input_ids=input_ids, position_ids=position_ids)
    layers = models["sdpa"].config.num_hidden_layers
    assert sdpa_calls == [(4, False), (8, False), (12, False)] * layers  # a plain causal row: no mask either


def test_a_custom_block_mask_keeps_its_pattern_inside_each_block(models, sdpa_calls):
    """lorelay's preference rows: a reply attends to its prompt, not to its sibling reply."""
    first = causal(7)
    first[5:, 2:5] = False  # prompt 0-1, chosen 2-4, rejected 5-6
    mask = block_diagonal(first, causal(4))[None, None]
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 2, 3, 0, 1, 2, 3]])
    torch.manual_seed(3)
    input_ids = torch.randint(0, 1000, (1, 11))
    assert_same(models, input_ids=input_ids, position_ids=position_ids, attention_mask=mask)
    layers = models["sdpa"].config.num_hidden_layers
    # prompt + chosen on the causal fast path; the rejected reply against the prompt and itself only
    assert sdpa_calls == [(5, False), (2, True), (4, False)] * layers


def test_a_shared_prompt_block_splits_into_its_causal_start_and_the_other_replies():
    block = causal(9)
    block[5:7, 2:5] = False  # prompt 0-1, replies 2-4, 5-6 and 7-8, each seeing only the prompt and itself
    block[7:, 2:7] = False
    calls = attention.row_plan(block_diagonal(block, causal(2)))
    assert [(c.queries, c.mask is None) for c in calls] == [(slice(0, 5), True), (slice(5, 9), False),
                                                            (slice(9, 11), True)]
    assert calls[1].keys.tolist() == [0, 1, 5, 6, 7, 8]
    assert torch.equal(calls[1].mask[0, 0], block[5:][:, [0, 1, 5, 6, 7, 8]])


def test_one_sequence_and_padded_generation_go_to_sdpa_whole(models, tokenizer, sdpa_calls):
    torch.manual_seed(4)
    assert_same(models, input_ids=torch.randint(0, 1000, (1, 10)))
    layers = models["sdpa"].config.num_hidden_layers
    assert sdpa_calls == [(10, False)] * layers
    tokenizer.padding_side = "left"
    batch = tokenizer(["a short one", "a somewhat longer prompt than the first"], return_tensors="pt", padding=True)
    outputs = [model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
               for model in (models["sdpa"], models[attention.NAME])]
    assert torch.equal(outputs[0], outputs[1])


def test_auto_picks_it_on_cpu_and_load_base_registers_it(tiny_model_dir):
    from stages.core.modeling import ModelConfig, load_base

    base = load_base(ModelConfig(name=str(tiny_model_dir)))
    assert base.attn_implementation == attention.NAME
    assert base.model.config._attn_implementation == attention.NAME
