"""DPO on packed rows: which batching a run gets, and one step's loss, reference log-probs and metrics.

``TRL's DPOTrainer`` pads every chosen and rejected sequence to the longest in the batch and runs the LM
head on every position (TRL 1.16 switched its ``padding_free`` off). Here each pair is one segment of a
single row (``collate``), and log-probs come from the completion positions only (``logps``); the loss
formulas are TRL's (``losses.dpo_loss``). ``choose_batching`` says, before the trainer exists, whether a
run can use it and, if not, why (``batching``); the trainer (``stages.core.compat.packed_dpo_trainer``) calls
the rest.
"""

from __future__ import annotations

from stages.core.preference.batching import Batching, choose, router_reason
from stages.core.preference.collate import PackedPairCollator
from stages.core.preference.logps import reference_sequence_logps, sequence_logps, supports_packed_logps
from stages.core.preference.losses import DPO_PACKED_LOSSES, PairLogps, dpo_loss


def choose_batching(model, args, attention: str) -> Batching:
    """The batching a DPO run with TRL ``args`` on ``model`` (attention kernel ``attention``) gets."""
    losses = [args.loss_type] if isinstance(args.loss_type, str) else list(args.loss_type)
    reasons = []
    if unknown := [loss for loss in losses if loss not in DPO_PACKED_LOSSES]:
        reasons.append(f"loss {', '.join(unknown)} has no packed form")
    divergence = getattr(args.f_divergence_type, "value", args.f_divergence_type)
    if divergence != "reverse_kl":
        reasons.append(f"f_divergence_type {args.f_divergence_type} is not implemented on packed rows")
    if args.use_weighting:
        reasons.append("WPO weighting needs per-token probabilities of the whole vocabulary")
    if args.ld_alpha is not None:
        reasons.append("LD-DPO's length split is not implemented on packed rows")
    reasons += router_reason(model)
    if reason := supports_packed_logps(model):
        reasons.append(reason)
    return choose(reasons, attention)


def collator(batching: Batching, args, model=None) -> PackedPairCollator:
    return PackedPairCollator(max_length=args.max_length, truncation_mode=args.truncation_mode,
                              share_prompt=batching.shares_prompt)


def model_inputs(batch: dict) -> dict:
    """The packed batch without the precomputed reference values (a model never reads those)."""
    return {key: value for key, value in batch.items() if key not in ("ref_chosen_logps", "ref_rejected_logps")}


def reference_logps(model, ref_model, batch: dict):
    """(chosen, rejected) reference log-probs of a packed batch (``logps.reference_sequence_logps``)."""
    return reference_sequence_logps(model, ref_model, model_inputs(batch)).chunk(2)


def loss_and_metrics(trainer, model, batch: dict):
    """The DPO loss of a packed batch, the metrics TRL's DPOTrainer logs and the row's tokens, as (loss,
    metrics, row tokens, None): there are no outputs to return."""
    import torch

    policy = sequence_logps(model, model_inputs(batch))
    pair = PairLogps.split(policy.logps, policy.tokens)
    if "ref_chosen_logps" in batch:
        ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    else:
        ref_chosen, ref_rejected = reference_logps(model, trainer.ref_model, batch)
    args = trainer.args
    loss = dpo_loss(pair, ref_chosen, ref_rejected, beta=args.beta, loss_types=trainer.loss_types,
                    loss_weights=trainer.loss_weights, label_smoothing=args.label_smoothing,
                    discopop_tau=args.discopop_tau)
    gather = trainer.accelerator.gather_for_metrics
    with torch.no_grad():
        chosen_rewards = args.beta * (pair.chosen - ref_chosen).detach()
        rejected_rewards = args.beta * (pair.rejected - ref_rejected).detach()
        tokens = gather(policy.tokens.sum().reshape(1)).sum()
        chosen_tokens, rejected_tokens = (gather(t.sum().reshape(1)).sum().clamp(min=1) for t in policy.tokens.chunk(2))
        chosen_logits, rejected_logits = (gather(v.sum().reshape(1)).sum() for v in policy.mean_logits.chunk(2))
        metrics = {
            "entropy": (gather(policy.entropy.reshape(1)).sum() / tokens.clamp(min=1)).item(),
            "logits/chosen": (chosen_logits / chosen_tokens).item(),
            "logits/rejected": (rejected_logits / rejected_tokens).item(),
            "mean_token_accuracy": (gather(policy.correct.chunk(2)[0].sum().reshape(1)).sum() / chosen_tokens).item(),
            "rewards/chosen": gather(chosen_rewards).mean().item(),
            "rewards/rejected": gather(rejected_rewards).mean().item(),
            "rewards/accuracies": gather((chosen_rewards > rejected_rewards).float()).mean().item(),
            "rewards/margins": gather(chosen_rewards - rejected_rewards).mean().item(),
            "logps/chosen": gather(pair.chosen.detach()).mean().item(),
            "logps/rejected": gather(pair.rejected.detach()).mean().item(),
        }
        row_tokens = gather(torch.tensor([batch["input_ids"].shape[1]], device=tokens.device)).sum().item()
    return loss, metrics, row_tokens, None
