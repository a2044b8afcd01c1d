"""KTO on packed rows: one step's loss, the reference log-probs and the metrics TRL's ``KTOTrainer`` logs.

TRL's ``KTOTrainer`` pads each micro-batch of (prompt, completion) examples, and a second one of the same
prompts with mismatched completions (``KL_completion_ids``: each example's completion rotated by one within
its batch, fixed when the dataset is prepared), from which it estimates the KL term without gradient. Here
each batch is a padding-free row, one segment per sequence (``collate.unpaired_groups``), the LM head on
completion tokens only. Nothing is shared: an example has one completion, and its KL completion goes through
TRL's separate no-gradient pass, which a shared row would have to run with gradient. The loss is TRL's
(``losses.kto_loss``), with the KL estimate averaged over processes and clamped at zero as TRL does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from stages.core import compat
from stages.core.preference.batching import Batching, choose, router_reason
from stages.core.preference.collate import pack, unpaired_groups
from stages.core.preference.logps import reference_sequence_logps, sequence_logps, supports_packed_logps
from stages.core.preference.losses import kto_loss

KL_ROW = "KL_row"  # the packed batch's second row: the KL completions (lorelay's key, not TRL's)
UNSHARED = "a KTO example has one completion, and its KL completion runs in TRL's separate no-gradient pass"


def choose_batching(model, args, attention: str) -> Batching:
    """The batching a KTO run on ``model`` gets (TRL ``args`` change nothing about it)."""
    reasons = router_reason(model)
    if reason := supports_packed_logps(model):
        reasons.append(reason)
    return choose(reasons, attention, unshared=UNSHARED)


@dataclasses.dataclass
class PackedUnpairedCollator:
    """TRL's KTO columns -> a packed row of completions (sequence i: example i), and under ``KL_ROW`` one of
    the KL completions; labels and precomputed reference log-probs passed through. Cut as TRL's
    ``DataCollatorForUnpairedPreference`` cuts: each sequence's first ``max_length`` tokens."""

    max_length: int | None = None
    block_mask: bool = True

    def __call__(self, examples: list[dict]) -> dict[str, Any]:
        import torch

        batch = self.row(examples, compat.KTO_COMPLETION_IDS)
        if compat.KTO_KL_COMPLETION_IDS in examples[0]:
            batch[KL_ROW] = self.row(examples, compat.KTO_KL_COMPLETION_IDS)
        batch[compat.KTO_LABEL] = torch.tensor([example[compat.KTO_LABEL] for example in examples])
        for key in (compat.KTO_REF_LOGPS, compat.KTO_REF_KL_LOGPS):
            if key in examples[0]:
                batch[key] = torch.tensor([example[key] for example in examples])
        return batch

    def row(self, examples: list[dict], completion_key: str) -> dict[str, Any]:
        sequences = [{compat.PROMPT_IDS: example[compat.PROMPT_IDS], compat.KTO_COMPLETION_IDS: example[completion_key]}
                     for example in examples]
        return pack(unpaired_groups(sequences, max_length=self.max_length, share_prompt=False),
                    with_mask=self.block_mask)


def collator(batching: Batching, args, model=None) -> PackedUnpairedCollator:
    return PackedUnpairedCollator(max_length=args.max_length, block_mask=batching.block_mask)


def reference_logps(model, ref_model, batch: dict):
    """(completion, KL completion or None) reference log-probs, as ``KTOTrainer.compute_ref_log_probs``."""
    kl = reference_sequence_logps(model, ref_model, batch[KL_ROW]) if KL_ROW in batch else None
    return reference_sequence_logps(model, ref_model, batch), kl


def loss_and_metrics(trainer, model, batch: dict):
    """(loss, the metrics TRL's KTOTrainer logs, row tokens, None)."""
    import torch

    args, gather = trainer.args, trainer.accelerator.gather_for_metrics
    policy = sequence_logps(model, batch)
    desirable = batch[compat.KTO_LABEL].to(torch.bool)
    if compat.KTO_REF_LOGPS in batch:
        ref, ref_kl = batch[compat.KTO_REF_LOGPS], batch.get(compat.KTO_REF_KL_LOGPS)
    else:
        ref, ref_kl = reference_logps(model, trainer.ref_model, batch)
    if KL_ROW in batch:
        with torch.no_grad():
            kl_logps = sequence_logps(model, batch[KL_ROW]).logps
        kl = gather((kl_logps - ref_kl).mean().detach()).mean().clamp(min=0)
    else:
        kl = torch.zeros(1, device=policy.logps.device)
    loss = kto_loss(policy.logps, ref, desirable, kl=kl, beta=args.beta, desirable_weight=args.desirable_weight,
                    undesirable_weight=args.undesirable_weight, loss_type=args.loss_type)

    metrics: dict[str, float] = {"kl": kl.item()}
    with torch.no_grad():
        tokens = gather(policy.tokens.sum().reshape(1)).sum()
        metrics["entropy"] = (gather(policy.entropy.reshape(1)).sum() / tokens).item() if tokens > 0 else 0.0
        rewards = args.beta * (policy.logps.detach() - ref)
        for side, chosen in (("chosen", desirable), ("rejected", ~desirable)):
            side_tokens = gather(policy.tokens[chosen].sum().reshape(1)).sum()
            if side_tokens > 0:
                metrics[f"logits/{side}"] = (gather(policy.mean_logits[chosen].sum().reshape(1)).sum()
                                             / side_tokens).item()
            count = gather(chosen.sum().reshape(1)).sum().item()
            if count > 0:
                metrics[f"rewards/{side}"] = gather(rewards[chosen].nansum().reshape(1)).nansum().item() / count
                metrics[f"logps/{side}"] = (gather(policy.logps.detach()[chosen].nansum().reshape(1)).nansum().item()
                                            / count)
        if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        row_tokens = gather(torch.tensor([batch["input_ids"].shape[1]], device=tokens.device)).sum().item()
    return loss, metrics, row_tokens, None
