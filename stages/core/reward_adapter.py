"""A trained reward model (an ``rm`` stage) as one of GRPO's rewards, on the policy's own base.

The policy is a PEFT model over the shared base. The reward model's LoRA weights go beside the policy's as a
second named adapter (``reward``), frozen; its score head is a small linear layer on a sequence classifier
whose backbone *is* the policy's backbone (``stages.core.scoring.sequence_classifier``). Scoring switches
the active adapter to ``reward``, scores prompt + completion at the last token (as the RM was trained), and
switches back, so the policy's adapter is active again for the loss. No second copy of the base exists; the
reward adapter's weights (rank r per adapted layer) and the head are the only extra memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from stages.core.errors import LorelayError
from stages.core.modeling import lora_config, settings_from_adapter
from stages.core.rewards import text_of
from stages.core.scoring import SCORE_HEAD, score, sequence_classifier

ADAPTER = "reward"  # the reward model's adapter name beside the policy's "default" (and TRL's "ref")


class RewardModelReward:
    """``reward(prompts, completions, **columns) -> list[float]``: the reward model's score of each reply."""

    def __init__(self, policy, tokenizer, rm_dir: str | Path, *, weight: float = 1.0, name: str = "reward_model",
                 batch_size: int = 8):
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        rm_dir = Path(rm_dir)
        if ADAPTER in policy.peft_config:
            raise LorelayError(f"the policy already has an adapter named '{ADAPTER}'")
        settings = settings_from_adapter(rm_dir)
        modules = {module_name.rsplit(".", 1)[-1] for module_name, _ in policy.named_modules()}
        # The head lives on the classifier below, not on the causal LM; other saved modules must exist there.
        settings.modules_to_save = [m for m in settings.modules_to_save if m != SCORE_HEAD and m in modules]
        adapter_config = lora_config(settings, "causal")
        adapter_config.inference_mode = True
        device = next(policy.parameters()).device
        weights = load_peft_weights(str(rm_dir), device=str(device))
        head_keys = [key for key in weights if key.rsplit(".", 2)[-2] == SCORE_HEAD]
        if not head_keys:
            raise LorelayError("not a reward model: the adapter has no score head", file=rm_dir,
                               hint="train one with `lorelay rm`")
        policy.add_adapter(ADAPTER, adapter_config)
        lora_weights = {key: value for key, value in weights.items() if key not in head_keys}
        result = set_peft_model_state_dict(policy, lora_weights, adapter_name=ADAPTER)
        missing = [key for key in result.missing_keys if f".{ADAPTER}." in key and "lora_" in key]
        if missing:
            policy.delete_adapter(ADAPTER)
            raise LorelayError(f"reward model does not fit this base ({len(missing)} LoRA weights missing, e.g. "
                               f"{missing[0]})", file=rm_dir)
        for param_name, param in policy.named_parameters():
            if f".{ADAPTER}." in param_name:
                param.requires_grad_(False)

        self.policy, self.tokenizer, self.batch_size = policy, tokenizer, batch_size
        self.classifier = sequence_classifier(policy.get_base_model(), tokenizer)
        head = getattr(self.classifier, SCORE_HEAD)
        head.weight.data.copy_(weights[head_keys[0]].to(head.weight.dtype))
        head.requires_grad_(False)
        self.name = self.__name__ = name  # TRL logs it as rewards/<name>/mean
        self.weight = weight
        self.path = rm_dir
        self.fn = f"reward model {rm_dir}"

    def __repr__(self) -> str:
        return f"RewardModelReward({self.name!r}, path={str(self.path)!r}, weight={self.weight})"

    def __call__(self, prompts: Sequence, completions: Sequence, **columns) -> list[float]:
        conversations = [_messages(prompt) + [{"role": "assistant", "content": text_of(completion)}]
                         for prompt, completion in zip(prompts, completions)]
        previous, was_training = self.policy.active_adapter, self.policy.training
        self.policy.set_adapter(ADAPTER, inference_mode=True)
        try:
            return score(self.classifier, self.tokenizer, conversations, batch_size=self.batch_size)
        finally:
            # set_adapter makes the named adapter the trainable one again (and freezes the others);
            # the backbone goes back to the mode the trainer had it in (activation checkpointing needs train).
            self.policy.set_adapter(previous)
            self.policy.train(was_training)


def _messages(prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": text_of([m]) if not isinstance(m.get("content"), str) else m["content"]}
            for m in prompt]
