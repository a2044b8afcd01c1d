"""Which batching a DPO run gets, and the reason it is told when it does not get packed, prompt-sharing rows."""

from __future__ import annotations

import types

import pytest
import torch

from stages.core.preference.dpo_step import choose_batching


def args(**overrides):
    settings = dict(loss_type=["sigmoid"], f_divergence_type="reverse_kl", use_weighting=False, ld_alpha=None)
    return types.SimpleNamespace(**{**settings, **overrides})


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def test_masked_kernels_share_the_prompt(model):
    for kernel in ("sdpa", "eager"):
        batching = choose_batching(model, args(), kernel)
        assert batching.packed and batching.shares_prompt and batching.reason is None


def test_flash_attention_packs_without_sharing_and_says_why(model):
    batching = choose_batching(model, args(), "flash_attention_2")
    assert batching.packed and not batching.shares_prompt
    assert "takes no block mask" in batching.describe()


@pytest.mark.parametrize("overrides, reason", [
    (dict(use_weighting=True), "WPO weighting"),
    (dict(ld_alpha=0.5), "LD-DPO"),
    (dict(f_divergence_type="js_divergence"), "f_divergence_type js_divergence"),
    (dict(loss_type=["sigmoid", "made_up"]), "loss made_up has no packed form"),
])
def test_settings_that_need_trls_forward_fall_back_with_the_reason(model, overrides, reason):
    batching = choose_batching(model, args(**overrides), "sdpa")
    assert not batching.packed and reason in batching.reason
    assert batching.describe().startswith("padded (TRL): ")


def test_unknown_kernels_fall_back(model):
    batching = choose_batching(model, args(), "flex_attention")
    assert not batching.packed and "flex_attention" in batching.reason


def test_kto_packs_one_segment_per_sequence_and_says_why(model):
    from stages.core.preference import kto_step

    masked = kto_step.choose_batching(model, args(), "sdpa")
    assert masked.packed and masked.block_mask and not masked.shares_prompt
    assert masked.describe().startswith("packed, prompt repeated: a KTO example has one completion")
    flash = kto_step.choose_batching(model, args(), "flash_attention_2")
    assert flash.packed and not flash.block_mask


def test_orpo_shares_prompts_and_the_reward_model_needs_a_score_head(model):
    from stages.core.preference import orpo_step, reward_step

    assert orpo_step.choose_batching(model, args(), "sdpa").shares_prompt
    sampling = orpo_step.choose_batching(model, args(generate_during_eval=True), "sdpa")
    assert not sampling.packed and "generate_during_eval" in sampling.reason
    batching = reward_step.choose_batching(model, args(), "sdpa")  # a causal LM: no score head to read
    assert not batching.packed and "no separate backbone and score head" in batching.reason


def test_padding_free_true_refuses_a_run_that_would_pad(model):
    import types

    from stages.core.errors import ConfigError
    from stages.core.preference.batching import report_batching

    trainer = types.SimpleNamespace(batching=choose_batching(model, args(use_weighting=True), "sdpa"))
    with pytest.raises(ConfigError, match="dpo batches cannot be packed here.*WPO") as refused:
        report_batching("dpo", True, trainer)
    assert refused.value.field == "data.padding_free"
    assert report_batching("dpo", None, trainer).startswith("padded (TRL): WPO")
