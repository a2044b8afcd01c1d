"""The reward model's pair loss on packed rows: each pair's shared start once, a score at each side's end.

TRL's ``RewardTrainer`` pads every chosen and rejected conversation to the longest in the batch and pools each
row's score at its last token that is not the pad token. Here a pair is one group of a packed row: the tokens
both sides begin with (the prompt, and any common start of the replies) once, then each side's remaining
tokens attending to that start and to themselves (``collate``). Causal attention makes the shared start's
hidden states the same for both sides, so each side's score, read at its last non-pad token, is what it
would be alone. The loss is TRL's (``losses.reward_pair_loss``: margin and reward centring included).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from stages.core import compat
from stages.core.preference.batching import Batching, choose, router_reason
from stages.core.preference.collate import groups_of_sides, pack
from stages.core.preference.logps import bare_model, sequence_scores
from stages.core.preference.losses import reward_pair_loss


def supports_packed_scores(model) -> str | None:
    """None when ``sequence_scores`` reads exactly the classifier's own scores, else why it cannot."""
    base, reason = bare_model(model)
    if reason:
        return reason
    if not hasattr(base, "score") or getattr(base, "base_model", base) is base:
        return f"{type(base).__name__} has no separate backbone and score head"
    return None


def choose_batching(model, args, attention: str) -> Batching:
    """The batching a reward-model run on ``model`` gets (TRL ``args`` change nothing about it)."""
    reasons = router_reason(model)
    if reason := supports_packed_scores(model):
        reasons.append(reason)
    return choose(reasons, attention)


def pooled(ids: list[int], pad_token_id: int | None) -> list[int]:
    """``ids`` up to the token a sequence classifier pools (its last token that is not the pad token; the
    first token when all are): nothing after it changes its hidden state."""
    end = len(ids)
    while pad_token_id is not None and end > 1 and ids[end - 1] == pad_token_id:
        end -= 1
    return ids[:end]


def common_start(first: list[int], second: list[int]) -> int:
    return len(os.path.commonprefix([first, second]))  # element-wise on any sequences, token lists included


@dataclasses.dataclass
class PackedRewardCollator:
    """Tokenized pairs (``chosen_ids``, ``rejected_ids``, optional ``margin``) -> one packed row: chosen i is
    sequence i, rejected i is n + i; ``sequence_ends`` are where their scores are read."""

    pad_token_id: int | None
    share_prompt: bool = True
    block_mask: bool = True

    def __call__(self, examples: list[dict]) -> dict[str, Any]:
        import torch

        pairs = []
        for example in examples:
            chosen, rejected = (pooled(example[key], self.pad_token_id) for key in (compat.CHOSEN_IDS, compat.REJECTED_IDS))
            start = common_start(chosen, rejected)
            pairs.append(tuple((ids[:start], ids[start:], [False] * (len(ids) - start)) for ids in (chosen, rejected)))
        batch = pack(groups_of_sides(pairs, share_prompt=self.share_prompt), with_mask=self.block_mask)
        if "margin" in examples[0]:
            batch["margin"] = torch.tensor([example["margin"] for example in examples], dtype=torch.float)
        return batch


def collator(batching: Batching, args, model) -> PackedRewardCollator:
    """Pools by the pad token TRL's ``RewardTrainer`` put in the model's config (built after its ``__init__``)."""
    return PackedRewardCollator(pad_token_id=model.config.get_text_config().pad_token_id,
                                share_prompt=batching.shares_prompt, block_mask=batching.block_mask)


def loss_and_metrics(trainer, model, batch: dict):
    """(loss, the metrics TRL's RewardTrainer logs, row tokens, outputs with TRL's ``logits`` of shape (2n, 1))."""
    import torch

    scores = sequence_scores(model, batch)
    chosen, rejected = scores.chunk(2)
    loss = reward_pair_loss(chosen, rejected, batch.get("margin"), trainer.args.center_rewards_coefficient)
    gather = trainer.accelerator.gather_for_metrics
    with torch.no_grad():
        every = trainer.accelerator.gather(scores.detach())
        metrics = {"min_reward": every.min().item(), "mean_reward": every.mean().item(),
                   "max_reward": every.max().item(),
                   "accuracy": gather((chosen > rejected).float().mean()).mean().item(),
                   "margin": gather((chosen - rejected).mean()).mean().item()}
        row_tokens = gather(torch.tensor([batch["input_ids"].shape[1]], device=scores.device)).sum().item()
    return loss, metrics, row_tokens, {"logits": scores[:, None]}
