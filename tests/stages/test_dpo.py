"""The preference stage on the tiny model: DPO moves margins against a frozen reference on one base,
ORPO and KTO learn, losses combine, bad pairs are named by file:line, and the win rate adds up."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import types

import pytest
import torch

from stages import dpo
from stages.core.config import load_config
from stages.core.errors import ConfigError, DataError
from stages.core.modeling import (LoraSettings, ModelConfig, attach_adapter, detach_adapter, load_base,
                             parameter_storage)
from stages.core.training import verify_output
from tests.conftest import copies_of, save_perturbed, write_jsonl

QUEUES = ("billing", "shipping", "returns", "account")
ISSUES = {"billing": "I was charged twice", "shipping": "the parcel never arrived",
          "returns": "I want to send it back", "account": "I cannot log in"}
PAIRS = [{"prompt": f"Route ticket {i}: {ISSUES[q]}", "chosen": f"Queue: {q}",
          "rejected": f"Queue: {QUEUES[(k + 1) % 4]}"}
         for i in range(6) for k, q in enumerate(QUEUES)]
KTO_ROWS = [{"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
            for p in PAIRS for side in ("chosen", "rejected")]
LORA = LoraSettings(r=8, alpha=16, dropout=0.0)


# One torch thread for the whole module (conftest.one_thread: the tiny model is faster without OpenMP).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return load_base(ModelConfig(name=str(tiny_model_dir)))


@pytest.fixture(scope="module")
def incoming(base, tmp_path_factory):
    """A trained-looking SFT adapter: LoRA with nonzero B, so the reference differs from the bare base."""
    return save_perturbed(attach_adapter(base.model, LORA), tmp_path_factory.mktemp("sft-adapter"), seed=1)


def dpo_config(tmp_path, data_file, *overrides) -> dpo.DPOConfig:
    return load_config(dpo.DPOConfig, None, [
        f"data.datasets=[{{path: {data_file}}}]", "data.eval_ratio=0.2", "data.max_length=64",
        f"training.output_dir={tmp_path / 'dpo'}", "training.max_steps=12", "training.batch_size=4",
        "training.gradient_accumulation_steps=1", "training.learning_rate=2e-2", "training.logging_steps=1",
        "training.warmup_ratio=0.0", "lora.r=8", "lora.alpha=16", "lora.dropout=0.0", "sample_prompts=2",
        "max_new_tokens=4", *overrides])


def digests(model) -> dict[str, str]:
    """Bit-exact fingerprints of every weight, kept as strings so no second copy stays resident."""
    return {name: hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for name, t in model.state_dict().items()}


def completion_logp(model, tokenizer, prompt: str, reply: str) -> float:
    messages = [{"role": "user", "content": prompt}]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    ids = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": reply}],
                                        return_dict=True)["input_ids"]
    assert ids[:len(prompt_ids)] == prompt_ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    logps = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    return float(logps[len(prompt_ids) - 1:].sum())


def pair_margins(base, adapter_dir) -> list[float]:
    model = attach_adapter(base.model, LORA, init_from=adapter_dir).eval()
    try:
        return [completion_logp(model, base.tokenizer, p["prompt"], p["chosen"])
                - completion_logp(model, base.tokenizer, p["prompt"], p["rejected"]) for p in PAIRS]
    finally:
        detach_adapter(model)


@pytest.fixture(scope="module")
def dpo_run(base, incoming, tmp_path_factory):
    """One DPO run from the incoming adapter, watched from inside ``fit``."""
    from safetensors.torch import load_file

    tmp = tmp_path_factory.mktemp("dpo-run")
    data_file = write_jsonl(tmp / "pairs.jsonl", PAIRS)
    config = dpo_config(tmp, data_file, "training.max_steps=8", "training.trl_args={logging_nan_inf_filter: false}")
    embedding_shape = base.model.get_input_embeddings().weight.shape
    base_storage = parameter_storage(base.model)
    base_before = digests(base.model)
    embedding_copies_before = copies_of(embedding_shape)
    incoming_weights = load_file(incoming / "adapter_model.safetensors")
    seen: dict = {}
    real_fit = dpo.fit

    def watching_fit(trainer, output, training):
        model = trainer.model
        refs = {name: p for name, p in model.named_parameters() if ".ref." in name}
        seen.update(ref_model=trainer.ref_model, adapters=sorted(model.peft_config), ref_count=len(refs),
                    ref_trainable=[n for n, p in refs.items() if p.requires_grad],
                    nan_inf_filter=trainer.args.logging_nan_inf_filter)
        seen["ref_is_incoming"] = [n for n, p in refs.items()
                                   if not torch.equal(p, incoming_weights[n.replace(".ref.", ".")])]
        result = real_fit(trainer, output, training)
        seen["ref_after_is_incoming"] = [n for n, p in refs.items()
                                         if not torch.equal(p, incoming_weights[n.replace(".ref.", ".")])]
        tensors = list(model.named_parameters()) + list(model.named_buffers())
        seen["foreign_storage"] = [n for n, t in tensors if "lora_" not in n
                                   and t.untyped_storage().data_ptr() not in base_storage]
        seen["new_embedding_copies"] = copies_of(embedding_shape) - embedding_copies_before
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dpo, "fit", watching_fit)
        output = dpo.run(config, base, adapter=incoming)
    return types.SimpleNamespace(output=output, seen=seen, base_before=base_before, config=config)


def test_dpo_trains_against_a_frozen_copy_of_the_incoming_adapter(dpo_run, base):
    seen = dpo_run.seen
    assert seen["ref_model"] is None and seen["adapters"] == ["default", "ref"]
    assert seen["ref_count"] > 0 and not seen["ref_trainable"]
    assert not seen["ref_is_incoming"], "TRL's ref adapter is not a copy of the incoming adapter"
    moved = seen["ref_after_is_incoming"]
    assert not moved, f"reference weights moved in training: {moved[:3]}"
    # The base is bit-identical after the stage and comes back bare.
    assert digests(base.model) == dpo_run.base_before
    assert not any("lora_" in name for name, _ in base.model.named_parameters())
    assert "forward" not in vars(base.model)


def test_trl_args_reach_the_dpo_trainer(dpo_run):
    assert dpo_run.seen["nan_inf_filter"] is False  # TRL's default is True


def test_dpo_keeps_one_set_of_base_weights_resident(dpo_run):
    assert not dpo_run.seen["foreign_storage"], dpo_run.seen["foreign_storage"][:3]
    assert not dpo_run.seen["new_embedding_copies"]


def test_dpo_raises_margins_over_the_reference(dpo_run, base, incoming):
    before = pair_margins(base, incoming)
    after = pair_margins(base, dpo_run.output)
    gains = [a - b for a, b in zip(after, before)]
    assert sum(gains) / len(gains) > 0.5, gains
    assert sum(g > 0 for g in gains) >= 0.8 * len(gains)

    metrics = json.loads((dpo_run.output / "metrics.json").read_text())
    for key in ("eval_loss", "eval_reward_accuracy", "eval_reward_margin", "eval_logps_chosen",
                "eval_logps_rejected", "train_reward_margin"):
        assert isinstance(metrics[key], float), key
    history = metrics["train_history"]
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 0
    assert history[-1]["reward_margin"] > history[0]["reward_margin"]
    assert metrics["reference"].startswith("adapter copy 'ref'")
    assert metrics["win_rate_skipped"] == "no reward_model configured"


def test_dpo_output_holds_only_the_policy_adapter(dpo_run, base):
    from safetensors.torch import load_file

    output = dpo_run.output
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json", "metrics.json",
                 "samples.json", "manifest.json"):
        assert (output / name).exists(), name
    assert not (output / "ref").exists()
    manifest = verify_output(output)
    assert manifest["stage"] == "dpo" and manifest["init_from"]
    saved = load_file(output / "adapter_model.safetensors")
    assert saved and not [k for k in saved if ".ref" in k]
    samples = json.loads((output / "samples.json").read_text())
    assert len(samples) == 2 and {"prompt", "policy", "reference"} <= set(samples[0])
    model = attach_adapter(base.model, LORA, init_from=output)
    try:
        loaded = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
        assert all(torch.equal(loaded[k], v) for k, v in saved.items())
    finally:
        detach_adapter(model)


@pytest.mark.parametrize("method, extra", [("orpo", []), ("kto", ["beta=0.5", "training.max_steps=16"])])
def test_orpo_and_kto_lower_their_loss(method, extra, tmp_path, base, incoming):
    # 16 examples in micro-batches of 4: every 4 steps are an epoch over the same batches (KTO reads them in
    # order, so its epochs see identical batches), and epoch means compare like with like. KTO gets a fourth
    # epoch: its undesirable batches fall slowly (3 epochs measured 0.84x the first epoch's loss in one run).
    rows = (KTO_ROWS if method == "kto" else PAIRS)[:16]
    data_file = write_jsonl(tmp_path / f"{method}.jsonl", rows)
    config = dpo_config(tmp_path, data_file, f"method={method}", "data.eval_ratio=0.0",
                        f"data.eval_datasets=[{{path: {data_file}}}]", *extra)
    output = dpo.run(config, base, adapter=incoming)
    metrics = json.loads((output / "metrics.json").read_text())
    losses = [entry["loss"] for entry in metrics["train_history"]]
    assert len(losses) == config.training.max_steps and sum(losses[-4:]) < 0.8 * sum(losses[:4]), losses
    assert metrics["method"] == method and math.isfinite(metrics["eval_loss"])
    assert metrics["eval_reward_margin"] > 0  # chosen/desirable replies now score above the others
    if method == "orpo":
        assert metrics["reference"] == "none (ORPO)" and "eval_reward_accuracy" in metrics
        assert metrics["batching"] == "packed, prompt shared"
    else:
        assert metrics["reference"].startswith("adapter copy 'ref'") and "eval_kl" in metrics
        assert metrics["batching"].startswith("packed, prompt repeated: a KTO example has one completion")
    assert "forward" not in vars(base.model)


def test_kto_splits_declared_pairs_into_desirable_and_undesirable_examples(tmp_path, base):
    data_file = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:8])
    config = dpo_config(tmp_path, data_file, "method=kto", f"data.datasets=[{{path: {data_file}, format: preference}}]",
                        "training.max_steps=2", "data.eval_ratio=0.0")
    metrics = json.loads((dpo.run(config, base) / "metrics.json").read_text())
    assert metrics["data"]["lengths"]["train"] == {"examples": 16, "used": 16, "dropped_prompt_too_long": 0,
                                                   "truncated": 0}
    assert metrics["reference"] == "base (adapters disabled)"


def test_demo_config_loads():
    config = load_config(dpo.DPOConfig, "configs/dpo.yaml")
    assert config.method == "dpo" and config.loss_type == ["sigmoid"]
    assert config.win_rate_prompts.path == "data/demo/prompts.jsonl"
    assert 5e-5 <= config.training.learning_rate <= 1e-4


def test_weighted_combination_of_losses(tmp_path, base):
    data_file = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    config = dpo_config(tmp_path, data_file, "loss_type=[sigmoid, sft]", "loss_weights=[1.0, 0.5]",
                        "training.max_steps=3", "data.eval_ratio=0.0")
    assert config.loss_type == ["sigmoid", "sft"]
    output = dpo.run(config, base)  # no incoming adapter: the reference is the base with adapters off
    metrics = json.loads((output / "metrics.json").read_text())
    first = metrics["train_history"][0]["loss"]
    # At step 0 the sigmoid term is exactly log 2; the weighted SFT term (a token NLL) comes on top of it.
    assert first > math.log(2) + 0.5, first
    assert metrics["reference"] == "base (adapters disabled)"
    assert verify_output(output)["config"]["loss_weights"] == [1.0, 0.5]


def test_rpo_alpha_adds_an_sft_term_on_the_chosen_replies(tmp_path):
    config = dpo_config(tmp_path, "x.jsonl", "loss_type=ipo", "rpo_alpha=0.5")
    assert (config.loss_type, config.loss_weights) == (["ipo", "sft"], [1.0, 0.5])
    config = dpo_config(tmp_path, "x.jsonl", "loss_type=[sigmoid, robust]", "loss_weights=[0.8, 0.2]",
                        "label_smoothing=0.1", "rpo_alpha=1.0")
    assert (config.loss_type, config.loss_weights) == (["sigmoid", "robust", "sft"], [0.8, 0.2, 1.0])


def test_malformed_pairs_are_rejected_with_file_and_line(tmp_path, base):
    rows = [PAIRS[0], {"prompt": "Route ticket x", "chosen": "Queue: billing"}, PAIRS[1]]
    data_file = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"bad\.jsonl:2.*rejected"):
        dpo.run(dpo_config(tmp_path, data_file), base)
    same = write_jsonl(tmp_path / "same.jsonl", [PAIRS[0], PAIRS[1], {**PAIRS[2], "rejected": PAIRS[2]["chosen"]}])
    with pytest.raises(DataError, match=r"same\.jsonl:3.*identical"):
        dpo.run(dpo_config(tmp_path, same), base)
    assert not any("lora_" in name for name, _ in base.model.named_parameters())


@pytest.mark.parametrize("overrides, message", [
    (["loss_type=[sigmoid, ipo]", "loss_weights=[1.0]"], "1 weights for 2 loss types"),
    (["loss_type=sigmiod"], "did you mean 'sigmoid'"),
    (["loss_type=[sigmoid, sft]", "rpo_alpha=1.0"], "already has an sft term"),
    (["rpo_alpha=0"], "must be positive"),
    (["method=orpo", "rpo_alpha=1.0"], "ORPO has no reference"),
    (["method=kto", "rpo_alpha=1.0"], "KTO has one loss"),
    (["loss_type=exo_pair"], "label_smoothing > 0"),
    (["method=orpo", "precompute_ref_log_probs=true"], "ORPO has no reference"),
    (["method=kto", "loss_type=sigmoid"], "did you mean 'kto'|KTO's loss"),
    (["method=kto", "training.batch_size=1"], "batch_size must be at least 2"),
    (["data.datasets=[{path: x.jsonl, format: kto}]"], "use method: kto"),
    (["method=kto", "data.datasets=[{path: x.jsonl, format: preference}]", "data.eval_datasets=[{path: y.jsonl}]"],
     "declare format: preference on every dataset"),
])
def test_settings_that_do_not_combine_are_refused(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        dpo_config(tmp_path, "x.jsonl", *overrides)


def test_dpo_trains_on_packed_rows_and_says_so(tmp_path, base, incoming):
    """The default: lorelay's packed rows (each prompt once), here with the reference log-probs precomputed
    through them; ``padding_free: false`` runs TRL's padded batches. Both give the same first loss."""
    data_file = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    runs = {}
    for name, overrides in (("packed", ["training.max_steps=1", "precompute_ref_log_probs=true"]),
                            ("padded", ["training.max_steps=1", "data.padding_free=false"])):
        out = dpo.run(dpo_config(tmp_path / name, data_file, *overrides, "training.learning_rate=1e-9"), base,
                      adapter=incoming)
        runs[name] = json.loads((out / "metrics.json").read_text())
    assert runs["packed"]["batching"] == "packed, prompt shared"
    assert runs["padded"]["batching"].startswith("padded (TRL)")
    first = {name: next(e for e in m["log_history"] if "loss" in e) for name, m in runs.items()}
    for key in ("loss", "logps/chosen", "logps/rejected", "rewards/margins"):
        assert first["packed"][key] == pytest.approx(first["padded"][key], abs=1e-4), key
    assert not any("lora_" in name for name, _ in base.model.named_parameters())


def test_win_rate_is_judged_by_the_reward_model(tmp_path, base, monkeypatch):
    from stages import reward
    from stages.core import scoring

    data_file = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    rm_dir = reward.run(load_config(reward.RewardConfig, None, [
        f"data.datasets=[{{path: {data_file}}}]", "data.eval_ratio=0.0", f"training.output_dir={tmp_path / 'rm'}",
        "training.max_steps=3", "training.batch_size=8", "training.learning_rate=1e-2", "lora.r=4", "lora.alpha=8",
        "lora.dropout=0.0"]), base)
    judged: list = []
    real_reward_model = scoring.reward_model

    @contextlib.contextmanager
    def watched_reward_model(shared, directory):
        judged.append(not any("lora_" in name for name, _ in shared.model.named_parameters()))
        with real_reward_model(shared, directory) as scorer:
            yield scorer

    monkeypatch.setattr(scoring, "reward_model", watched_reward_model)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Route ticket {i}: {ISSUES[q]}"}
                                                       for i, q in enumerate(QUEUES * 2)])
    config = dpo_config(tmp_path, data_file, f"reward_model={rm_dir}", f"win_rate_prompts={prompts}",
                        "win_rate_samples=5", "training.max_steps=4", "data.eval_ratio=0.0")
    output = dpo.run(config, base)
    assert judged == [True], "the reward model must go on a base without the DPO adapter"

    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["win_rate_n"] == 5
    assert metrics["wins"] + metrics["losses"] + metrics["ties"] == 5
    assert metrics["win_rate"] == pytest.approx(metrics["wins"] / 5)
    decided = metrics["wins"] + metrics["losses"]
    assert metrics["win_rate_excl_ties"] == (pytest.approx(metrics["wins"] / decided) if decided else None)
    samples = json.loads((output / "samples.json").read_text())
    assert len(samples) == 5 and samples[0]["source"].endswith("prompts.jsonl:1")
    assert [s["outcome"] for s in samples].count("win") == metrics["wins"]
    assert all(isinstance(s["policy_score"], float) and isinstance(s["reference_score"], float) for s in samples)
    assert not any("lora_" in name for name, _ in base.model.named_parameters())


def test_missing_reward_model_skips_the_win_rate(tmp_path):
    config = dpo_config(tmp_path, "x.jsonl", f"reward_model={tmp_path / 'nowhere'}")
    assert dpo._reward_model_dir(config) is None
    assert "not found" in dpo._skip_reason(config)
