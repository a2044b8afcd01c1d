"""ORPO on packed rows: one step's loss and the metrics TRL's ``ORPOTrainer`` logs, from TRL's own tokenization.

TRL's experimental ``ORPOTrainer`` tokenizes each side of a pair whole (its prompt labelled -100, a BOS and an
EOS added, the reply cut to ``max_length``) and pads chosen and rejected rows to the longest. Here the two
sides of a pair become one group of a packed row, the prompt once, as long as both sides tokenized their
prompt alike (a merge at the prompt's end can differ: then each side gets its own group). ORPO's NLL covers
prompt *and* chosen reply, so the prompt's own tokens are scored as a third sequence per pair
(``collate.Group.prompt_sequence``); its odds ratio uses the length-averaged reply log-probs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from stages.core import compat
from stages.core.preference.batching import Batching, choose, router_reason
from stages.core.preference.collate import Side, groups_of_sides, pack
from stages.core.preference.logps import sequence_logps, supports_packed_logps
from stages.core.preference.losses import PairLogps, orpo_loss


def choose_batching(model, args, attention: str) -> Batching:
    """The batching an ORPO run with TRL ``args`` on ``model`` gets."""
    reasons = router_reason(model)
    if getattr(args, "generate_during_eval", False):
        reasons.append("generate_during_eval samples from the prompts of TRL's padded batches")
    if getattr(model.config, "is_encoder_decoder", False):
        reasons.append("an encoder-decoder model scores replies in its decoder, not after the prompt")
    if reason := supports_packed_logps(model):
        reasons.append(reason)
    return choose(reasons, attention)


def sides(example: dict) -> tuple[Side, Side]:
    """(chosen, rejected) of one ORPO-tokenized pair, each cut where its labels start."""
    cut = []
    for ids_key, labels_key in compat.ORPO_SIDES:
        ids, labels = example[ids_key], example[labels_key]
        start = next((j for j, label in enumerate(labels) if label != compat.ORPO_IGNORED_LABEL), len(labels))
        cut.append((ids[:start], ids[start:], [True] * (len(ids) - start)))
    return cut[0], cut[1]


@dataclasses.dataclass
class PackedORPOCollator:
    """ORPO's tokenized pairs -> one packed row: chosen i is sequence i, rejected i is n + i, and the prompt of
    chosen i (for the NLL) is 2n + i."""

    share_prompt: bool = True
    block_mask: bool = True

    def __call__(self, examples: list[dict]) -> dict[str, Any]:
        groups = groups_of_sides([sides(example) for example in examples], share_prompt=self.share_prompt,
                                 score_prompt=True)
        return pack(groups, with_mask=self.block_mask)


def collator(batching: Batching, args, model=None) -> PackedORPOCollator:
    return PackedORPOCollator(share_prompt=batching.shares_prompt, block_mask=batching.block_mask)


def loss_and_metrics(trainer, model, batch: dict, train_eval: str = "train") -> tuple[Any, dict[str, float]]:
    """(loss, metrics) as ``ORPOTrainer.get_batch_loss_metrics`` returns them, keys prefixed ``eval_`` in
    evaluation. ``logits/*`` average the logits of the scored positions (TRL's, of every padded position)."""
    import torch
    import torch.nn.functional as F

    policy = sequence_logps(model, batch)
    n = policy.logps.numel() // 3
    pair = PairLogps.split(policy.logps[:2 * n], policy.tokens[:2 * n])
    loss, log_odds, nll = orpo_loss(pair, policy.logps[2 * n:], policy.tokens[2 * n:], beta=trainer.beta)
    gather = trainer.accelerator.gather_for_metrics
    with torch.no_grad():
        chosen = pair.chosen.detach() / pair.chosen_tokens.clamp(min=1)
        rejected = pair.rejected.detach() / pair.rejected_tokens.clamp(min=1)
        chosen_rewards, rejected_rewards = trainer.beta * chosen, trainer.beta * rejected
        mean_logits = [gather(v.sum().reshape(1)).sum() / gather(t.sum().reshape(1)).sum().clamp(min=1)
                       for v, t in zip(policy.mean_logits[:2 * n].chunk(2), policy.tokens[:2 * n].chunk(2))]
        metrics = {
            "rewards/chosen": gather(chosen_rewards).mean(),
            "rewards/rejected": gather(rejected_rewards).mean(),
            "rewards/accuracies": gather((chosen_rewards > rejected_rewards).float()).mean(),
            "rewards/margins": gather(chosen_rewards - rejected_rewards).mean(),
            "logps/rejected": gather(rejected).mean(),
            "logps/chosen": gather(chosen).mean(),
            "logits/rejected": mean_logits[1],
            "logits/chosen": mean_logits[0],
            "nll_loss": gather(nll.detach()).mean(),
            "log_odds_ratio": gather(F.logsigmoid(log_odds.detach()).mean()).mean(),
            "log_odds_chosen": gather(log_odds.detach().mean()).mean(),
        }
    prefix = "eval_" if train_eval == "eval" else ""
    return loss, {f"{prefix}{key}": value.item() for key, value in metrics.items()}
