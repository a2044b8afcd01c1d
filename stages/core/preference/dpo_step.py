"""DPO on packed rows: which batching a run gets, and one step's loss, reference log-probs and metrics.

``TRL's DPOTrainer`` pads every chosen and rejected sequence to the longest in the batch and runs the LM
head on every position (TRL 1.16 switched its ``padding_free`` off). Here each pair is one segment of a
single row (``collate``), and log-probs come from the completion positions only (``logps``); the loss
formulas are TRL's (``losses.dpo_loss``). ``choose_batching`` says, before the trainer exists, whether a
run can use it and, if not, why; the trainer (``stages.core.compat.packed_dpo_trainer``) calls the rest.
"""

from __future__ import annotations

import contextlib
import dataclasses

from stages.core import compat
from stages.core.preference.collate import MASKED_ATTENTION, PackedPairCollator
from stages.core.preference.logps import sequence_logps, supports_packed_logps
from stages.core.preference.losses import DPO_PACKED_LOSSES, PairLogps, dpo_loss

# Kernels that separate packed sequences by their restarting position ids but take no block mask.
POSITION_ID_ATTENTION = ("flash_attention_2", "flash_attention_3")


@dataclasses.dataclass(frozen=True)
class Batching:
    layout: str            # "packed, prompt shared" | "packed, prompt repeated" | "padded (TRL)"
    reason: str | None     # why the run does not get the first, in words; None when it does

    @property
    def packed(self) -> bool:
        return self.layout != "padded (TRL)"

    @property
    def shares_prompt(self) -> bool:
        return self.layout == "packed, prompt shared"

    def describe(self) -> str:
        return self.layout + (f": {self.reason}" if self.reason else "")


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
    if getattr(model.config.get_text_config(), "output_router_logits", None) is not None:
        reasons.append("a mixture-of-experts auxiliary loss needs TRL's forward")
    if reason := supports_packed_logps(model):
        reasons.append(reason)
    if reasons:
        return Batching("padded (TRL)", "; ".join(reasons))
    if attention in MASKED_ATTENTION:
        return Batching("packed, prompt shared", None)
    if attention in POSITION_ID_ATTENTION:
        return Batching("packed, prompt repeated", f"{attention} takes no block mask, so a prompt cannot be shared "
                                                   "between its replies")
    return Batching("padded (TRL)", f"{attention} attention takes neither a block mask nor packed position ids")


def collator(batching: Batching, args) -> PackedPairCollator:
    return PackedPairCollator(max_length=args.max_length, truncation_mode=args.truncation_mode,
                              share_prompt=batching.shares_prompt)


def model_inputs(batch: dict) -> dict:
    """The packed batch without the precomputed reference values (a model never reads those)."""
    return {key: value for key, value in batch.items() if key not in ("ref_chosen_logps", "ref_rejected_logps")}


def reference_logps(model, ref_model, batch: dict):
    """(chosen, rejected) reference log-probs: ``ref_model``, or the policy's ``ref`` adapter copy, or the
    base with adapters disabled (TRL's one-base reference)."""
    import torch
    from trl.trainer.utils import use_adapter

    inner = getattr(model, "module", model)
    if ref_model is None and hasattr(inner, "peft_config"):
        context = use_adapter(inner, adapter_name=compat.TRL_REFERENCE_ADAPTER if compat.has_reference_adapter(inner) else None)
        scorer = model
    else:
        context, scorer = contextlib.nullcontext(), ref_model or model
    with torch.no_grad(), context:
        result = sequence_logps(scorer, model_inputs(batch))
    return result.logps.chunk(2)


def loss_and_metrics(trainer, model, batch: dict):
    """The DPO loss of a packed batch and the metrics TRL's DPOTrainer logs, as (loss, metrics)."""
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
    return loss, metrics, row_tokens


def report_batching(method: str, padding_free: bool | None, trainer) -> str:
    """How ``trainer`` batches pairs, in words, printed once; a ``ConfigError`` where padding was ruled out
    (``padding_free: true``) and the packed rows do not apply."""
    from stages.core.errors import ConfigError
    from stages.core.training import is_main_process

    batching = getattr(trainer, "batching", None)
    if batching is None:
        described = (f"padded (TRL): {method.upper()} runs TRL's own collator (packed rows are dpo-only)"
                     if method != "dpo" else "padded (TRL): data.padding_free is false")
    else:
        described = batching.describe()
        if padding_free and not batching.packed:
            raise ConfigError(f"these pairs cannot be packed ({batching.reason})", field="data.padding_free",
                              hint="set data.padding_free: null to fall back to TRL's padded batches")
    if is_main_process():
        print(f"lorelay: {method} batches: {described}")
    return described
