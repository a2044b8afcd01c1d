"""One lifecycle for the shared base: after every stage type (and the judge) the base is exactly as it
was lent - modes, checkpointing, hooks, patched forwards, wrappers, adapters, vocabulary, weights - and an
adapter trained with new tokens loads in the next stage."""

from __future__ import annotations

import pytest
import torch

from stages import dpo, generate, reward, sft
from stages.core import scoring
from stages.core.config import load_config
from stages.core.lifecycle import adapter_tokens, borrow, extend_vocabulary
from stages.core.modeling import LoraSettings, attach_adapter
from stages.core.training import verify_output
from tests.conftest import NEW_TOKENS, base_state, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = ["training.max_steps=2", "training.batch_size=4", "training.learning_rate=1e-2",
         "training.logging_steps=1", "training.warmup_ratio=0.0"]
CHATS = [{"messages": [{"role": "user", "content": f"Route ticket {i}: the <|nimbus|> is broken"},
                       {"role": "assistant", "content": "Zorblax queue"}]} for i in range(8)]
PAIRS = [{"prompt": f"Question {i}?", "chosen": f"Answer {i}. — Support", "rejected": f"Answer {i}."}
         for i in range(8)]


@pytest.fixture(scope="module")
def chain(new_tokens_cpt):
    """cpt (new tokens) -> sft -> rm -> generate -> dpo on one base with activation checkpointing, and the
    base's state around each stage."""
    base, root = new_tokens_cpt.base, new_tokens_cpt.root / "chain"
    chats = write_jsonl(root / "chats.jsonl", CHATS)
    pairs = write_jsonl(root / "pairs.jsonl", PAIRS)
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": f"Question {i}?"} for i in range(3)])
    states = {"cpt": (new_tokens_cpt.before, new_tokens_cpt.after)}
    outputs = {"cpt": new_tokens_cpt.output}
    plan = [
        ("sft", sft, sft.SFTConfig, "cpt", [f"data.datasets=[{{path: {chats}}}]", "data.eval_ratio=0.25",
                                           "data.sample_prompts=1", "sample_max_new_tokens=2", *TRAIN]),
        ("rm", reward, reward.RewardConfig, "sft", [f"data.datasets=[{{path: {pairs}}}]", "data.eval_ratio=0.25",
                                                   *TRAIN]),
        ("generate", generate, generate.GenerateConfig, "sft", [
            f"prompts={{path: {prompts}}}", "samples_per_prompt=2", "max_new_tokens=3", "min_score_gap=0.0",
            f"reward_model={root / 'rm'}", f"output_dir={root / 'generate'}"]),
        ("dpo", dpo, dpo.DPOConfig, "sft", [f"data.datasets=[{{path: {pairs}}}]", "data.eval_ratio=0.25",
                                           "data.max_length=64", "sample_prompts=1", "max_new_tokens=2",
                                           f"reward_model={root / 'rm'}", *TRAIN]),
    ]
    for name, module, config_class, parent, overrides in plan:
        output = [] if name == "generate" else [f"training.output_dir={root / name}"]
        config = load_config(config_class, None, [*overrides, *output])
        before = base_state(base)
        outputs[name] = module.run(config, base, adapter=outputs[parent])
        states[name] = (before, base_state(base))
    before = base_state(base)
    with scoring.reward_model(base, outputs["rm"]) as judge:
        scores = scoring.score(judge, base.tokenizer, [[{"role": "user", "content": "Hi <|nimbus|>"},
                                                       {"role": "assistant", "content": "Zorblax"}]])
    states["judge"] = (before, base_state(base))
    return {"states": states, "outputs": outputs, "scores": scores, "base": base}


@pytest.mark.chain
@pytest.mark.slow
@pytest.mark.parametrize("stage", ["cpt", "sft", "rm", "generate", "dpo", "judge"])
def test_each_stage_returns_the_base_exactly_as_lent(chain, stage):
    before, after = chain["states"][stage]
    assert before["checkpointing"] is False, "the borrower turns activation checkpointing on, not the base"
    changed = [key for key in before if before[key] != after[key]]
    assert not changed, f"{stage} left the base changed in: {changed}"


@pytest.mark.chain
@pytest.mark.slow
def test_an_adapter_with_new_tokens_carries_them_into_the_next_stages(chain):
    base, outputs = chain["base"], chain["outputs"]
    rows = base.model.get_input_embeddings().weight.shape[0]
    for name in ("sft", "rm", "dpo"):
        verify_output(outputs[name])
        assert adapter_tokens(outputs[name], base.tokenizer) == NEW_TOKENS, name
    from safetensors.torch import load_file

    embedding_rows = {key: tensor.shape[0] for key, tensor in load_file(outputs["sft"] / "adapter_model.safetensors").items()
                      if "embed_tokens" in key}
    assert embedding_rows and set(embedding_rows.values()) == {rows + len(NEW_TOKENS)}, embedding_rows
    assert len(chain["scores"]) == 1 and torch.isfinite(torch.tensor(chain["scores"])).all()


def test_borrow_undoes_adapters_wrappers_hooks_patches_and_vocabulary_even_on_error(new_tokens_cpt):
    base = new_tokens_cpt.base
    before = base_state(base)
    with pytest.raises(RuntimeError, match="stage failed"):
        with borrow(base, new_tokens_cpt.output) as model:
            assert len(base.tokenizer) == before["vocabulary"][2] + len(NEW_TOKENS)
            peft_model = attach_adapter(model, LoraSettings(r=2, alpha=4, modules_to_save=["embed_tokens", "lm_head"]),
                                        init_from=new_tokens_cpt.output)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
            model.forward = lambda *args, **kwargs: None  # as TRL patches a forward in place
            peft_model.train()
            raise RuntimeError("stage failed")
    assert base_state(base) == before


def test_nested_borrows_restore_what_the_outer_one_lent(new_tokens_cpt):
    base = new_tokens_cpt.base
    before = base_state(base)
    with borrow(base) as model:
        policy = attach_adapter(model, LoraSettings(r=2, alpha=4))
        with_policy = base_state(base)
        with borrow(base, new_tokens_cpt.output):
            extend_vocabulary(base, ["<|another|>"])
            model.train()
        assert base_state(base) == with_policy
        assert policy.peft_config
    assert base_state(base) == before
