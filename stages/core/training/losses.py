"""Logits and loss only where there is a label: the LM head runs on the loss-bearing positions alone.

With assistant-only loss, most positions of a chat sample (system prompt, user turn, template markup) have
no label, yet the usual causal-LM loss projects every position onto the whole vocabulary and then throws
most of it away. For a small model that projection is a large part of a step (SmolLM2-135M: the
576 x 49,152 LM head is a fifth of the weights, and the softmax over 49,152 logits per token is memory
traffic on top). TRL's fused LM head skips unlabelled positions only on CUDA/XPU with Triton; on CPU (and
other devices) it scores every position, and recomputes the projection in its backward.

``compact_lm_loss`` asks the model for logits at the labelled positions only (transformers'
``logits_to_keep`` with a boolean mask), then takes the cross-entropy there: the same loss and the same
gradients as the full computation (``tests/stages/core/training/test_losses.py``), with the LM head, the softmax
and their backward on a fraction of the tokens. ``sft_trainer_class()`` is TRL's ``SFTTrainer`` with
that loss wherever it applies, and TRL's own loss everywhere else (see ``CompactLoss.applies``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect
from typing import Any

from stages.core import compat

# Above this many logits (labelled positions x vocabulary) the compact logits would take more memory than
# TRL's chunked head (which never holds more than 4,096 x 32,768), so TRL's loss is used instead.
MAX_COMPACT_LOGITS = 1 << 28  # 1 GiB of fp32 logits


@dataclasses.dataclass
class CompactLoss:
    """The loss of one batch, and what TRL logs beside it (summed over the labelled positions)."""

    loss: Any              # scalar tensor: summed cross-entropy / (num_items_in_batch or labelled positions)
    labelled: Any          # number of labelled positions (tensor)
    entropy_sum: Any       # summed entropy of the next-token distributions there (no gradient)
    correct: Any           # labelled positions whose label is the argmax (tensor)


def label_positions(labels):
    """Boolean mask ``(batch, seq)`` of the positions whose *next* token has a label, and those labels."""
    import torch

    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    return keep, labels[:, 1:][keep[:, :-1]]


def compact_lm_loss(model, inputs: dict, labels, num_items_in_batch=None) -> CompactLoss:
    """Causal-LM cross-entropy computed from the logits of labelled positions only.

    ``inputs`` are the model's keyword arguments without ``labels``; ``labels`` are unshifted, with -100
    where there is no loss (padding-free batches already hold -100 at each sample's first token, so no
    prediction crosses a sample boundary). Equal to ``model(**inputs, labels=labels).loss`` (divided by
    ``num_items_in_batch`` when given, as transformers' loss does under gradient accumulation).
    """
    import torch
    import torch.nn.functional as F

    keep, targets = label_positions(labels)
    logits = model(**inputs, logits_to_keep=keep).logits
    if logits.dim() != 2 or logits.shape[0] != targets.shape[0]:
        raise RuntimeError(f"{type(model).__name__} did not honour a boolean logits_to_keep mask "
                           f"(got logits of shape {tuple(logits.shape)} for {targets.shape[0]} labelled positions)")
    logits = logits.float()
    loss_sum = F.cross_entropy(logits, targets, reduction="sum")
    labelled = torch.as_tensor(targets.numel(), device=logits.device)
    denominator = labelled.clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    with torch.no_grad():
        log_probs = torch.log_softmax(logits, dim=-1)
        entropy_sum = -(log_probs.exp() * log_probs).sum()
        correct = (logits.argmax(dim=-1) == targets).sum()
    return CompactLoss(loss=loss_sum / denominator, labelled=labelled, entropy_sum=entropy_sum, correct=correct)


def trl_head_is_compact(device) -> bool:
    """True where TRL's fused LM head already scores only labelled positions (Triton on CUDA/XPU)."""
    return device.type in ("cuda", "xpu") and importlib.util.find_spec("triton") is not None


def accepts_logits_mask(model) -> bool:
    """Whether ``model`` (unwrapped from PEFT) takes ``logits_to_keep`` (a boolean mask in transformers 5)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(type(base).forward).parameters
    except (TypeError, ValueError):
        return False


@functools.cache
def sft_trainer_class():
    """TRL's ``SFTTrainer`` whose training and eval loss runs the LM head on labelled positions only.

    Everything but ``compute_loss`` is TRL's. The compact loss is used when it is exactly TRL's default
    negative log-likelihood (no label smoothing, DFT, custom loss function, MoE auxiliary loss, context or
    sequence parallelism, or prompt-learning adapter) on a device where TRL's head is not already compact,
    for a model that takes ``logits_to_keep``; otherwise TRL's ``compute_loss`` runs unchanged.
    """
    from trl import SFTTrainer

    return compat.trainer_with_loss(SFTTrainer, sft_compact_loss, name="LorelaySFTTrainer")


def sft_compact_loss(trainer, model, inputs, num_items_in_batch):
    """The compact loss of one batch for ``trainer`` (an SFTTrainer), or None where TRL's own applies."""
    if not compact_loss_applies(trainer, model, inputs):
        return None
    mode = "train" if trainer.model.training else "eval"
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    model_inputs["use_cache"] = False
    result = compact_lm_loss(model, model_inputs, inputs["labels"], num_items_in_batch)
    loss = result.loss
    # As TRL (and Trainer): num_items_in_batch counts every rank's tokens, and DDP averages gradients.
    if trainer.args.average_tokens_across_devices and num_items_in_batch is not None:
        loss = loss * (trainer.accelerator.num_processes // trainer.get_tp_size())
    _log_compact_metrics(trainer, mode, inputs, result)
    return loss


def compact_loss_applies(trainer, model, inputs) -> bool:
    labels = inputs.get("labels")
    if labels is None or labels.dim() != 2:
        return False
    if (trainer.compute_loss_func is not None or trainer.label_smoother is not None
            or trainer.args.loss_type != "nll" or trainer.aux_loss_enabled):
        return False
    parallelism = trainer.accelerator.parallelism_config
    if parallelism is not None and (parallelism.cp_enabled or parallelism.sp_enabled):
        return False
    if trl_head_is_compact(labels.device):
        return False
    unwrapped = trainer.accelerator.unwrap_model(model)
    peft_config = getattr(unwrapped, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return False
    if not accepts_logits_mask(unwrapped):
        return False
    labelled = int((labels[:, 1:] != -100).sum())
    return labelled * unwrapped.config.get_text_config().vocab_size <= MAX_COMPACT_LOGITS


def _log_compact_metrics(trainer, mode: str, inputs, result: CompactLoss) -> None:
    """The metrics TRL's compute_loss logs: entropy, mean_token_accuracy, num_tokens."""
    import torch

    gather = trainer.accelerator.gather_for_metrics
    labelled = gather(result.labelled.reshape(1)).sum()
    entropy = gather(result.entropy_sum.detach().reshape(1)).sum()
    correct = gather(result.correct.reshape(1)).sum()
    compat.log_trainer_metrics(trainer, mode, {
        "entropy": (entropy / labelled).item() if labelled > 0 else 0.0,
        "mean_token_accuracy": (correct / labelled).item() if labelled > 0 else 0.0})
    tokens = 0
    if mode == "train":
        if "attention_mask" in inputs:
            tokens = gather(inputs["attention_mask"].sum().reshape(1)).sum().item()
        else:
            local = torch.tensor([inputs["position_ids"].size(1)], device=inputs["position_ids"].device)
            tokens = gather(local).sum().item()
    compat.count_train_tokens(trainer, tokens // compat.tensor_parallel_size(trainer), mode)
