"""The reward-model stage on the tiny model: it learns, it shares the base, it scores consistently."""

from __future__ import annotations

import json
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from stages import reward
from stages.core.config import describe, load_config
from stages.core.data import DatasetSpec, load_mixture
from stages.core.errors import ConfigError, DataError, LorelayError
from stages.core.modeling import (LoraSettings, ModelConfig, attach_adapter, detach_adapter, load_base,
                             parameter_storage)
from stages.core.scoring import (attach_reward_adapter, conversation_ids, detach_reward_adapter, reward_model, score,
                                 score_ids, sequence_classifier)
from stages.reward import RewardConfig
from stages.core.training import verify_output
from tests.conftest import write_jsonl

GOOD = ["great", "helpful", "kind", "clear", "useful", "friendly", "correct", "precise"]
BAD = ["rude", "wrong", "vague", "useless", "lazy", "sloppy", "hostile", "confusing"]


def toy_pair(i: int) -> dict:
    """Chosen replies use one of 8 good words, rejected ones one of 8 bad words, in mixed pairings.

    With 16 words a random score head ranks them at about chance (unlike one fixed good/bad reply, which a
    random head separates half the time), so a high accuracy is learned, not drawn.
    """
    return {"prompt": f"Rate answer {i} in one word",
            "chosen": f"That answer is {GOOD[i % 8]}.",
            "rejected": f"That answer is {BAD[(i * 3 + i // 8) % 8]}."}


PROBES = [[{"role": "user", "content": f"Rate answer {i} in one word"},
           {"role": "assistant", "content": reply}]
          for i, reply in enumerate(["That answer is great.", "No.",
                                     "That answer is rude. " * 3, "That answer is precise."])]


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return load_base(ModelConfig(name=str(tiny_model_dir)))


def rm_config(tmp_path, train_file, *overrides) -> RewardConfig:
    return load_config(RewardConfig, None, [
        f"data.datasets=[{{path: {train_file}}}]", "data.eval_ratio=0.25",
        f"training.output_dir={tmp_path / 'rm'}", "training.max_steps=16", "training.batch_size=8",
        "training.learning_rate=1e-2", "training.logging_steps=1", "training.warmup_ratio=0.0",
        "lora.r=8", "lora.alpha=16", "lora.dropout=0.0", *overrides])


def base_snapshot(base) -> dict:
    return {name: tensor.clone() for name, tensor in base.model.state_dict().items()}


def assert_bare(base, snapshot: dict) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    wrapped = [name for name, module in base.model.named_modules()
               if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper))]
    assert not wrapped, f"adapter layers left on the base: {wrapped[:3]}"
    assert not hasattr(base.model, "peft_config")
    state = base.model.state_dict()
    assert state.keys() == snapshot.keys()
    changed = [name for name in snapshot if not torch.equal(state[name], snapshot[name])]
    assert not changed, f"base weights changed: {changed[:3]}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, base):
    """One RM training run; a spy on `fit` records what was resident and the trained model's scores."""
    tmp_path = tmp_path_factory.mktemp("rm")
    train_file = write_jsonl(tmp_path / "pairs.jsonl", [toy_pair(i) for i in range(64)])
    snapshot = base_snapshot(base)
    seen = {}
    real_fit = reward.fit

    def spy_fit(trainer, output, training):
        model = trainer.model
        evaluation = trainer.eval_dataset
        seen["before"] = reward.pair_metrics(
            score_ids(model, evaluation["chosen_ids"], batch_size=8),
            score_ids(model, evaluation["rejected_ids"], batch_size=8))["accuracy"]
        seen["model_storage"] = parameter_storage(model)
        seen["big_model"] = {p.untyped_storage().data_ptr() for p in model.parameters() if p.numel() >= 4096}
        result = real_fit(trainer, output, training)
        seen["trl_eval"] = trainer.evaluate()  # TRL's own loss, accuracy and margin on the same held-out pairs
        seen["eval_scores"] = [score_ids(model, evaluation[key], batch_size=8) for key in ("chosen_ids", "rejected_ids")]
        seen["scores"] = score(model, base.tokenizer, PROBES)
        return result

    with pytest.MonkeyPatch.context() as patch:  # a module-scoped fixture: no function-scoped monkeypatch
        patch.setattr(reward, "fit", spy_fit)
        output = reward.run(rm_config(tmp_path, train_file), base)
    return {"output": output, "seen": seen, "snapshot": snapshot}


def test_rm_learns_toy_preferences_and_writes_outputs(trained, base):
    output = trained["output"]
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json",
                 "chat_template.jinja", "metrics.json", "manifest.json"):
        assert (output / name).exists(), name
    manifest = verify_output(output)
    assert manifest["stage"] == "rm" and manifest["base_model"]["fingerprint"] == base.fingerprint

    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["eval_pairs"] == 16 and metrics["batching"] == "packed, prompt shared"
    assert trained["seen"]["before"] <= 0.75  # the fresh head is near chance ...
    assert metrics["eval_accuracy"] > 0.9, metrics  # ... and training makes it right
    assert metrics["eval_margin_mean"] > 0
    assert metrics["eval_chosen_score_mean"] > metrics["eval_rejected_score_mean"]
    trl = trained["seen"]["trl_eval"]  # one scoring pass gives what RewardTrainer.evaluate() reports
    assert metrics["eval_loss"] == pytest.approx(trl["eval_loss"], abs=1e-4)
    assert metrics["eval_accuracy"] == pytest.approx(trl["eval_accuracy"])
    assert metrics["eval_margin_mean"] == pytest.approx(trl["eval_margin"], abs=1e-4)
    for side, scores in zip(("chosen", "rejected"), trained["seen"]["eval_scores"]):
        values = torch.tensor(scores, dtype=torch.float64)
        expected = (values.mean(), values.std(correction=0), values.min(), values.max())
        got = [metrics[f"eval_{side}_score_{stat}"] for stat in ("mean", "std", "min", "max")]
        assert got == pytest.approx([float(v) for v in expected], abs=1e-6), side
    losses = [e["loss"] for e in metrics["log_history"] if "loss" in e]
    assert losses[-1] < losses[0] and metrics["train_loss"] is not None and "eval_loss" in metrics
    assert metrics["data"]["train"]["kept"] == 48

    # The score head is saved with the adapter, as a module to save.
    from safetensors.torch import load_file

    saved = load_file(output / "adapter_model.safetensors")
    assert "base_model.model.score.weight" in saved
    assert "score" in json.loads((output / "adapter_config.json").read_text())["modules_to_save"]
    assert_bare(base, trained["snapshot"])


def test_only_one_copy_of_the_base_is_resident(trained, base):
    seen = trained["seen"]
    base_storage = parameter_storage(base.model)
    backbone = parameter_storage(base.model.model)
    assert backbone <= seen["model_storage"], "the RM's backbone is not the base model's own modules"
    big_base = {p.untyped_storage().data_ptr() for p in base.model.parameters() if p.numel() >= 4096}
    assert seen["big_model"] == big_base  # every large weight is the base's; none doubled
    extra = seen["model_storage"] - base_storage
    assert len(extra) < 100  # only LoRA matrices and the score head (copy) besides the base


def test_reward_model_round_trip_reproduces_scores_and_leaves_base_bare(trained, base):
    with reward_model(base, trained["output"]) as model:
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())
        again = score(model, base.tokenizer, PROBES)
    assert again == trained["seen"]["scores"]  # exactly
    assert again[0] > again[2] and again[3] > again[2]  # good words above bad ones
    assert_bare(base, trained["snapshot"])


def test_score_is_the_same_batched_or_one_at_a_time(trained, base):
    # pad == eos == <|im_end|> in SmolLM2; ChatML ends a turn with "<|im_end|>\n", so the last token is "\n"
    # and the classifier's "rightmost non-pad token" is the true end of every conversation.
    ids = conversation_ids(base.tokenizer, PROBES[0])
    assert ids[-1] != base.tokenizer.pad_token_id and base.tokenizer.pad_token_id in ids
    with reward_model(base, trained["output"]) as model:
        batched = score(model, base.tokenizer, PROBES, batch_size=len(PROBES))
        alone = [score(model, base.tokenizer, [c], batch_size=1)[0] for c in PROBES]
        classifier = model.get_base_model()
        with torch.no_grad():
            hidden = classifier.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
            by_hand = classifier.score(hidden).item()
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(alone), rtol=0, atol=1e-5)
    assert by_hand == pytest.approx(alone[0], abs=1e-5)


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")
def test_starting_from_an_sft_adapter_loads_its_lora_weights(tmp_path, base):
    snapshot = base_snapshot(base)
    # A causal "SFT" adapter with non-zero LoRA B and a tuned lm_head (which an RM cannot use).
    sft = attach_adapter(base.model, LoraSettings(r=4, alpha=8, dropout=0.0, modules_to_save=["lm_head"]))
    torch.manual_seed(1)
    for name, param in sft.named_parameters():
        if "lora_B" in name:
            param.data.normal_()
    sft.save_pretrained(tmp_path / "sft")
    lora = {name: p.detach().clone() for name, p in sft.named_parameters() if "lora_" in name}
    detach_adapter(sft)

    rm, report = attach_reward_adapter(sequence_classifier(base.model, base.tokenizer), LoraSettings(r=16),
                                       init_from=tmp_path / "sft")
    try:
        # Both models keep the shared backbone under `model`, so module paths match one to one.
        loaded = {name: p for name, p in rm.named_parameters() if "lora_" in name}
        assert loaded.keys() == lora.keys()
        unequal = [name for name in lora if not torch.equal(loaded[name], lora[name])]
        assert not unequal, f"LoRA weights not loaded from the SFT adapter: {unequal[:3]}"
        assert report["left_out"] == ["base_model.model.lm_head.weight"]
        assert report["fresh"] == ["base_model.model.score.weight"]
        trainable = [n for n, p in rm.named_parameters() if p.requires_grad]
        assert any("score" in n for n in trainable) and any("lora_" in n for n in trainable)
    finally:
        detach_reward_adapter(rm)
    assert_bare(base, snapshot)


def test_run_from_an_sft_adapter_records_it(tmp_path, base):
    sft = attach_adapter(base.model, LoraSettings(r=4, alpha=8, dropout=0.0))
    sft.save_pretrained(tmp_path / "sft")
    detach_adapter(sft)
    train_file = write_jsonl(tmp_path / "pairs.jsonl", [toy_pair(i) for i in range(16)])
    output = reward.run(rm_config(tmp_path, train_file, "training.max_steps=2", "data.eval_ratio=0.0"), base,
                        adapter=tmp_path / "sft")
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["init_from"]["path"] == str(tmp_path / "sft")
    assert json.loads((output / "adapter_config.json").read_text())["r"] == 4  # the incoming shape wins
    assert "eval_accuracy" not in metrics  # no eval set


def test_activation_checkpointing_leaves_no_hooks_on_the_shared_base(tmp_path, tiny_model_dir):
    base = load_base(ModelConfig(name=str(tiny_model_dir), activation_checkpointing=True))
    embeddings = base.model.get_input_embeddings()
    train_file = write_jsonl(tmp_path / "pairs.jsonl", [toy_pair(i) for i in range(8)])
    reward.run(rm_config(tmp_path, train_file, "training.max_steps=1", "data.eval_ratio=0.0"), base)
    assert not embeddings._forward_hooks  # TRL's input-require-grads hook is gone
    assert not base.model.is_gradient_checkpointing and not base.model.training


def test_backbone_modules_to_save_do_not_replace_base_modules(base):
    snapshot = base_snapshot(base)
    rm, _ = attach_reward_adapter(sequence_classifier(base.model, base.tokenizer),
                                  LoraSettings(r=4, modules_to_save=["norm"]))
    for name, param in rm.named_parameters():
        if param.requires_grad:
            param.data.add_(1.0)
    detach_reward_adapter(rm)
    assert_bare(base, snapshot)


def test_malformed_pairs_are_rejected_with_file_and_line(tmp_path, base):
    good = toy_pair(0)
    identical = {"prompt": "Hi", "chosen": "Hello!", "rejected": "Hello!"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, identical])
    with pytest.raises(DataError, match=r"bad\.jsonl:3.*'rejected'.*identical"):
        reward.run(rm_config(tmp_path, path), base)

    missing = {"prompt": "Hi", "chosen": "Hello!"}
    path = write_jsonl(tmp_path / "missing.jsonl", [good, missing])
    with pytest.raises(DataError, match=r"missing\.jsonl:2.*'rejected'.*missing"):
        reward.run(rm_config(tmp_path, path), base)

    # skip_invalid counts them instead of stopping.
    mixture = load_mixture([DatasetSpec(path=str(tmp_path / "bad.jsonl"))], kind="preference", seed=0,
                           skip_invalid=True)
    assert mixture.report[0]["skipped"] == {"identical chosen and rejected": 1}


def test_tokenize_pairs_counts_truncation_and_keeps_margins(tokenizer):
    records = [{"prompt": [{"role": "user", "content": "Which queue? " * 20}],
                "chosen": [{"role": "assistant", "content": "billing"}],
                "rejected": [{"role": "assistant", "content": "shipping"}], "margin": 2.0, "source": "f.jsonl:1"},
               {"prompt": [{"role": "user", "content": "Short?"}],
                "chosen": [{"role": "assistant", "content": "yes"}],
                "rejected": [{"role": "assistant", "content": "no"}], "margin": None, "source": "f.jsonl:2"}]
    columns, report = reward.tokenize_pairs(tokenizer, records, max_length=40, truncation_side="left",
                                            with_margin=True)
    assert report.truncated == 1 and report.kept == 2
    assert max(len(ids) for ids in columns["chosen_ids"]) == 40
    # left truncation keeps the end, where the score is read
    full = conversation_ids(tokenizer, records[0]["prompt"] + records[0]["chosen"])
    assert columns["chosen_ids"][0] == full[-40:]
    assert columns["margin"] == [2.0, 0.0]
    # right truncation can cut away the only difference: such pairs are dropped and counted
    _, report = reward.tokenize_pairs(tokenizer, records[:1], max_length=40, truncation_side="right")
    assert report.kept == 0 and report.dropped == {"identical after truncation": 1}
    bad = dict(records[1], chosen=[{"role": "user", "content": "not a reply"}])
    with pytest.raises(DataError, match=r"f\.jsonl:2.*'chosen'.*assistant reply"):
        reward.tokenize_pairs(tokenizer, [bad], max_length=None)


def test_config_refuses_unknown_keys_and_demo_config_loads(capsys):
    with pytest.raises(ConfigError, match="did you mean 'center_rewards_coefficient'"):
        load_config(RewardConfig, None, ["data.datasets=[{path: x.jsonl}]", "center_reward_coefficient=0.01"])
    config = load_config(RewardConfig, "configs/rm.yaml")
    assert config.data.datasets[0].path == "data/demo/preferences.jsonl"
    from pipelines.single import run_stage_command

    assert run_stage_command("rm", None, [], help_config=True) == 0  # what `lorelay rm --help-config` runs
    assert "RewardConfig" in capsys.readouterr().out
    assert "center_rewards_coefficient" in [key for key, _, _ in describe(RewardConfig)]


def test_score_refuses_a_conversation_without_a_reply(base):
    classifier = sequence_classifier(base.model, base.tokenizer)
    with pytest.raises(LorelayError, match="conversation 1: .*assistant reply"):
        score(classifier, base.tokenizer, [PROBES[0], PROBES[0][:1]])


def test_eval_loss_is_trls_reward_loss():
    """The stage's eval loss equals RewardTrainer.compute_loss itself on the same scores (a stand-in trainer
    and model: compute_loss reads only these attributes)."""
    from trl import RewardTrainer

    chosen, rejected, margins = [1.5, -0.2, 30.0], [0.5, 0.3, -40.0], [0.0, 1.0, 2.0]
    logits = torch.tensor(chosen + rejected).unsqueeze(-1)
    same = lambda value: value  # noqa: E731 - one process: gathering returns the value
    trainer = SimpleNamespace(model=SimpleNamespace(training=False), args=SimpleNamespace(center_rewards_coefficient=0.01),
                              accelerator=SimpleNamespace(gather=same, gather_for_metrics=same),
                              _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0)
    trl_loss = RewardTrainer.compute_loss(trainer, lambda **inputs: SimpleNamespace(logits=logits),
                                          {"margin": torch.tensor(margins), "attention_mask": torch.ones(6, 1)})
    assert reward.eval_loss(chosen, rejected, margins, center_coefficient=0.01) == pytest.approx(trl_loss.item(),
                                                                                                rel=1e-6)


def test_reward_model_refuses_a_policy_adapter_and_an_attached_base(tmp_path, base):
    policy = attach_adapter(base.model, LoraSettings(r=4, alpha=8, dropout=0.0))
    policy.save_pretrained(tmp_path / "sft")
    try:
        with pytest.raises(LorelayError, match="still carries an adapter"):
            with reward_model(base, tmp_path / "sft"):
                pass
    finally:
        detach_adapter(policy)
    snapshot = base_snapshot(base)
    with pytest.raises(LorelayError, match="no score head"):
        with reward_model(base, tmp_path / "sft"):
            pass
    assert_bare(base, snapshot)
