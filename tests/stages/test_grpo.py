"""GRPO on the tiny model: rewards logged per function, the adapter learns, the reward model shares the base."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from stages import grpo
from stages.core import reward_adapter
from stages.core.config import load_config
from stages.core.errors import ConfigError
from stages.core.modeling import (LoraSettings, ModelConfig, attach_adapter, load_base,
                                  parameter_storage)
from stages.core.scoring import attach_reward_adapter, reward_model, score, sequence_classifier
from tests.conftest import copies_of, save_perturbed, write_jsonl

LORA = LoraSettings(r=8, alpha=16, dropout=0.0)
# A one-character system prompt: SmolLM2's template otherwise adds a 30-token default one, and on CPU TRL
# scores every position over the 49k-token vocabulary.
PROMPTS = [{"prompt": f"Route ticket {i}", "system": "S", "answer": "billing" if i % 2 else None}
           for i in range(40)]


# One torch thread for the whole module (conftest.one_thread: the tiny model is faster without OpenMP).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return load_base(ModelConfig(name=str(tiny_model_dir)))


@pytest.fixture(scope="module")
def incoming(base, tmp_path_factory):
    """A trained-looking SFT adapter."""
    return save_perturbed(attach_adapter(base.model, LORA), tmp_path_factory.mktemp("sft"), seed=1)


@pytest.fixture(scope="module")
def rm_dir(base, tmp_path_factory):
    """A reward-model directory as the rm stage writes it: LoRA + score head in modules_to_save."""
    model, _ = attach_reward_adapter(sequence_classifier(base.model, base.tokenizer), LORA)
    return save_perturbed(model, tmp_path_factory.mktemp("rm"), seed=2)


@pytest.fixture(scope="module")
def direction_reward(base, tmp_path_factory):
    """A user reward file: the share of a reply's tokens whose embedding points along a fixed random direction.

    Half the vocabulary qualifies, so every group has reward variance, and a LoRA shift of the final hidden state
    along that direction raises it: a task the tiny random model can learn in a few steps.
    """
    path = tmp_path_factory.mktemp("user-reward")
    embeddings = base.model.get_input_embeddings().weight.detach()
    direction = torch.randn(embeddings.shape[1], generator=torch.Generator().manual_seed(3))
    good = torch.nonzero(embeddings @ direction > 0)[:, 0].tolist()
    (path / "good_ids.json").write_text(json.dumps(good))
    (path / "aligned.py").write_text(textwrap.dedent(f"""
        import json
        GOOD = set(json.load(open({str(path / 'good_ids.json')!r})))

        def aligned(completions, completion_ids, **columns):
            return [sum(t in GOOD for t in ids) / max(len(ids), 1) for ids in completion_ids]
    """))
    return path / "aligned.py"


def grpo_config(tmp_path, data_file, *overrides) -> grpo.GRPOConfig:
    return load_config(grpo.GRPOConfig, None, [
        f"data.datasets=[{{path: {data_file}}}]", "data.eval_prompts=4", f"training.output_dir={tmp_path / 'grpo'}",
        "training.max_steps=12", "training.batch_size=4", "training.learning_rate=3e-2", "num_generations=4",
        "max_completion_length=6", "lora.r=8", "lora.alpha=16", *overrides])


@pytest.fixture(scope="module")
def grpo_run(base, incoming, rm_dir, direction_reward, tmp_path_factory):
    """GRPO from the SFT adapter with a user file reward (trained on), exact_match and the reward model (weight 0:
    scored and logged only), beta > 0. A spy on the reward model records what is resident when it scores."""
    from safetensors.torch import load_file

    tmp = tmp_path_factory.mktemp("grpo-run")
    data_file = write_jsonl(tmp / "prompts.jsonl", PROMPTS)
    config = grpo_config(tmp, data_file, f"rewards=[{{fn: '{direction_reward}:aligned'}}, "
                                         "{fn: exact_match, weight: 0.0}]",
                         f"reward_model={rm_dir}", "reward_model_weight=0.0", "beta=0.01")
    base_storage = parameter_storage(base.model)
    embedding_shape = base.model.get_input_embeddings().weight.shape
    embedding_copies = copies_of(embedding_shape)
    seen: dict = {"calls": []}
    real_call = reward_adapter.RewardModelReward.__call__

    def spy(self, prompts, completions, **columns):
        scores = real_call(self, prompts, completions, **columns)
        seen["calls"].append((list(prompts), [reward_adapter.text_of(c) for c in completions], scores))
        backbone = [(n, t) for n, t in [*self.classifier.named_parameters(), *self.classifier.named_buffers()]
                    if "lora_" not in n and not n.startswith("score")]
        seen["foreign"] = [n for n, t in backbone if t.untyped_storage().data_ptr() not in base_storage]
        if "new_embedding_copies" not in seen:  # a scan of every live tensor: once is enough
            seen["new_embedding_copies"] = copies_of(embedding_shape) - embedding_copies
        seen["active_after"] = self.policy.active_adapter
        seen["reward_trainable"] = [n for n, p in self.policy.named_parameters() if ".reward." in n and p.requires_grad]
        seen["adapters"] = sorted(self.policy.peft_config)
        return scores

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reward_adapter.RewardModelReward, "__call__", spy)
        output = grpo.run(config, base, adapter=incoming)
    metrics = json.loads((output / "metrics.json").read_text())
    return {"output": output, "metrics": metrics, "seen": seen, "incoming": load_file(incoming / "adapter_model.safetensors"),
            "trained": load_file(output / "adapter_model.safetensors")}


def test_rewards_are_logged_per_function_over_the_steps(grpo_run):
    history = grpo_run["metrics"]["train_history"]
    assert len(history) == 12
    for row in history:
        assert {"reward_aligned", "reward_exact_match", "reward_reward_model", "completion_length",
                "truncated_ratio", "clipped_ratio", "kl"} <= row.keys(), row
    assert grpo_run["metrics"]["generation"] == "transformers"
    assert grpo_run["metrics"]["reference"] == "adapter copy 'ref' (the incoming adapter, frozen)"


def test_the_policy_learns_its_reward(grpo_run):
    """Greedy replies to 4 held-out prompts, scored by the trained-on reward before and after 12 steps (fixed seed).

    What it proves: GRPO's update moves the policy toward what a reward pays for, on prompts it did not train on.
    What it does not: that a check such as exact_match is learned from scratch; a random model's replies never
    match, so every group would score alike and carry no advantage. The sampled groups' mean reward is noisy at
    4 completions per step (the order of earlier test modules alone moved the last six steps' sum by 0.08), so
    it is only required not to fall by more than a quarter of one step's reward range."""
    metrics = grpo_run["metrics"]
    assert metrics["eval_reward_aligned"] > metrics["eval_before_reward_aligned"] + 0.15, metrics
    rewards = [row["reward_aligned"] for row in metrics["train_history"]]
    assert sum(rewards[-6:]) >= sum(rewards[:6]) - 0.25, rewards


def test_every_adapter_weight_moved_from_the_incoming_one(grpo_run):
    incoming, trained = grpo_run["incoming"], grpo_run["trained"]
    assert trained.keys() == incoming.keys()
    unchanged = [k for k in incoming if torch.equal(incoming[k], trained[k]) and "lora_B" in k]
    assert not unchanged, f"LoRA B weights that did not train: {unchanged[:3]}"


def test_the_reward_model_scores_on_the_shared_base(grpo_run, base, rm_dir):
    seen = grpo_run["seen"]
    assert seen["calls"], "the reward model was never called"
    assert seen["foreign"] == [], f"backbone tensors not from the one base: {seen['foreign'][:3]}"
    assert seen["new_embedding_copies"] == set()
    assert seen["adapters"] == ["default", "ref", "reward"]
    assert seen["active_after"] == "default" and seen["reward_trainable"] == []
    # The same conversations scored by the rm stage's own loader on the bare base: equal scores prove the
    # reward adapter (not the policy's) was active, with the saved head.
    prompts, completions, scores = seen["calls"][-1]
    conversations = [list(p) + [{"role": "assistant", "content": c}] for p, c in zip(prompts, completions)]
    with reward_model(base, rm_dir) as scorer:
        expected = score(scorer, base.tokenizer, conversations)
    assert scores == pytest.approx(expected, abs=1e-4)


def test_output_holds_the_policy_adapter_and_the_base_comes_back_bare(grpo_run, base):
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = grpo_run["trained"].keys()
    assert not [n for n in names if ".ref." in n or ".reward." in n or "score" in n]
    assert not any(isinstance(m, BaseTunerLayer) for m in base.model.modules())
    samples = json.loads((grpo_run["output"] / "samples.json").read_text())
    assert len(samples) == 4 and {"before", "after", "scores_after"} <= samples[0].keys()


# ---- refused before anything loads -------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["num_generations=3"], "4 completions, not a multiple of num_generations (3)"),
    (["rewards=[]"], "GRPO needs a reward"),
    (["rewards=[{fn: exact_mach}]"], "did you mean 'exact_match'"),
    (["rewards=[{fn: 'nowhere.py:f'}]"], "reward file 'nowhere.py' not found"),
    (["num_generations=1"], "at least 2"),
    (["loss_type=ppo"], "expected one of dapo, grpo, dr_grpo"),
])
def test_settings_that_cannot_work_are_refused(tmp_path, overrides, message):
    data_file = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:4])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        grpo_config(tmp_path, data_file, "rewards=[{fn: exact_match}]", *overrides)


def test_bad_reward_in_a_config_file_names_its_line(tmp_path):
    data_file = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:4])
    path = tmp_path / "grpo.yaml"
    path.write_text(f"data:\n  datasets: [{{path: {data_file}}}]\nrewards:\n  - fn: exact_match\n"
                    "  - fn: regex\n    args: {patern: x}\n")
    with pytest.raises(ConfigError, match=r"grpo.yaml:6 field 'rewards.1.args.patern'.*did you mean 'pattern'"):
        load_config(grpo.GRPOConfig, path)


def test_a_reward_that_breaks_on_the_data_stops_before_training(tmp_path, base, monkeypatch):
    data_file = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:8])
    config = grpo_config(tmp_path, data_file, "rewards=[{fn: ends_with, args: {column: sign_off}}]")
    attached = []
    monkeypatch.setattr(grpo, "attach_adapter", lambda *a, **k: attached.append(1))
    with pytest.raises(ConfigError, match="reward 'ends_with'.*no column 'sign_off' \\(columns: answer"):
        grpo.run(config, base)
    assert attached == []


def test_vllm_is_refused_without_cuda(tmp_path, base):
    data_file = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:8])
    config = grpo_config(tmp_path, data_file, "rewards=[{fn: exact_match}]", "generation=vllm")
    with pytest.raises(ConfigError, match="vLLM generation needs a CUDA device"):
        grpo.run(config, base)


def test_the_shipped_config_loads():
    config = load_config(grpo.GRPOConfig, "configs/grpo.yaml")
    assert [r.name for r in config.rewards] == ["right_queue", "queue_only", "sign_off", "no_queue_label", "concise"]
    assert (config.loss_type, config.beta, config.num_generations) == ("dapo", 0.0, 4)
