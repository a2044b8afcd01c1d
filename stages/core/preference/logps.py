"""Per-sequence log-probabilities and reward scores from a packed row, with the LM head on scored tokens only.

The decoder runs once over the row; only the hidden states that predict a completion token go through the
LM head and the log-softmax (a prompt's last hidden state once for each of its replies), so the vocabulary
projection, its softmax and their backward cost (completion tokens x vocabulary) instead of (padded rows x
longest sequence x vocabulary). Token log-probs are summed per sequence with ``index_add`` (by segment).
"""

from __future__ import annotations

import dataclasses
from typing import Any

# Keys of a packed batch that are not model inputs.
PACKED_KEYS = ("score_positions", "score_targets", "score_sequences", "sequence_ends", "sequence_tokens",
               "group_starts")
# Groups are run through the decoder in pieces of about this many tokens: a dense attention kernel computes
# every (query, key) pair of what it is given, masked or not, so one row of a whole micro-batch would cost
# (all tokens)^2 where the groups need only the sum of (group tokens)^2.
PIECE_TOKENS = 1024


@dataclasses.dataclass
class SequenceLogps:
    logps: Any            # (S,) summed log-probs of each sequence's scored tokens
    tokens: Any           # (S,) scored tokens per sequence
    entropy: Any          # scalar: summed entropy of the scored positions (no gradient)
    correct: Any          # (S,) scored tokens whose argmax is the target (no gradient)
    mean_logits: Any      # (S,) summed mean logit of the scored positions (no gradient)


def causal_lm_parts(model):
    """(decoder, LM head) of a causal LM, a PEFT model around one, or an accelerate-wrapped one."""
    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner.get_decoder(), inner.get_output_embeddings()


def bare_model(model):
    """(the transformers model inside a PEFT or accelerate wrapper, why a packed row cannot stand in for its
    inputs, or None)."""
    inner = getattr(model, "module", model)
    peft_config = getattr(inner, "active_peft_config", None)
    reason = None
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        reason = "a prompt-learning adapter prepends virtual tokens to every sequence"
    return (inner.get_base_model() if hasattr(inner, "get_base_model") else inner), reason


def supports_packed_logps(model) -> str | None:
    """None when the packed path computes exactly the model's own log-probs, else the reason it cannot."""
    base, reason = bare_model(model)
    if reason:
        return reason
    config = base.config.get_text_config()
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(config, name, None) not in (None, 1.0):
            return f"the model post-processes its logits ({name})"
    if not hasattr(base, "get_decoder") or base.get_output_embeddings() is None:
        return f"{type(base).__name__} has no separate decoder and LM head"
    return None


def hidden_states(decoder, batch: dict, piece_tokens: int = PIECE_TOKENS):
    """The decoder's last hidden states of the packed row, (T, hidden), computed piece by piece: whole
    groups, about ``piece_tokens`` at a time (exact: no attention crosses a group boundary)."""
    import torch

    mask = batch["attention_mask"]
    pieces = []
    for start, end in _pieces(batch["group_starts"].tolist(), piece_tokens):
        out = decoder(input_ids=batch["input_ids"][:, start:end], position_ids=batch["position_ids"][:, start:end],
                      attention_mask=None if mask is None else _mask_for(decoder, mask[:, :, start:end, start:end]),
                      use_cache=False)
        pieces.append(out.last_hidden_state[0])
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _pieces(starts: list[int], budget: int) -> list[tuple[int, int]]:
    """Consecutive runs of whole groups of at most ``budget`` tokens (a longer group is a piece alone)."""
    pieces, begin = [], starts[0]
    for end, following in zip(starts[1:], starts[2:] + [None]):
        if following is None or following - begin > budget:
            pieces.append((begin, end))
            begin = end
    return pieces


def sequence_logps(model, batch: dict, num_sequences: int | None = None,
                   piece_tokens: int = PIECE_TOKENS) -> SequenceLogps:
    """Summed log-probs of each sequence's completion tokens, computed from a packed row."""
    import torch

    decoder, head = causal_lm_parts(model)
    hidden = hidden_states(decoder, batch, piece_tokens)
    logits = head(hidden.index_select(0, batch["score_positions"])).float()
    targets = batch["score_targets"]
    token_logps = logits.gather(1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
    sequences = batch["score_sequences"]
    count = num_sequences or batch["sequence_tokens"].numel()
    logps = torch.zeros(count, dtype=token_logps.dtype, device=token_logps.device).index_add(0, sequences, token_logps)
    with torch.no_grad():
        log_probs = torch.log_softmax(logits, dim=-1)
        entropy = -(log_probs.exp() * log_probs).sum()
        zeros = torch.zeros(count, dtype=logits.dtype, device=logits.device)
        correct = zeros.index_add(0, sequences, (logits.argmax(-1) == targets).to(logits.dtype))
        mean_logits = zeros.index_add(0, sequences, logits.mean(-1))
    return SequenceLogps(logps=logps, tokens=batch["sequence_tokens"], entropy=entropy, correct=correct,
                         mean_logits=mean_logits)


def reference_sequence_logps(model, ref_model, batch: dict):
    """Summed log-probs (S,) of each sequence under the frozen reference, without gradient: ``ref_model``, or
    the policy's ``ref`` adapter copy, or the base with adapters disabled (TRL's one-base reference)."""
    import contextlib

    import torch
    from trl.trainer.utils import use_adapter

    from stages.core import compat

    inner = getattr(model, "module", model)
    if ref_model is None and hasattr(inner, "peft_config"):
        adapter = compat.TRL_REFERENCE_ADAPTER if compat.has_reference_adapter(inner) else None
        context, scorer = use_adapter(inner, adapter_name=adapter), model
    else:
        context, scorer = contextlib.nullcontext(), ref_model or model
    with torch.no_grad(), context:
        return sequence_logps(scorer, batch).logps


def sequence_scores(model, batch: dict, head=None):
    """Reward scores (S,): the score head on each sequence's last hidden state (a sequence classifier).

    ``model`` is a ``...ForSequenceClassification`` (or a PEFT model around one); ``head`` defaults to its
    ``score`` module, which PEFT wraps with ``modules_to_save`` when it is trained.
    """
    base, _ = bare_model(model)
    decoder = base.base_model  # transformers' name for the backbone under a task head
    hidden = hidden_states(decoder, batch)
    score = head if head is not None else base.score
    return score(hidden.index_select(0, batch["sequence_ends"])).float()[:, 0]


def _mask_for(decoder, mask):
    """The boolean block mask as the attention implementation takes it (eager adds a float mask)."""
    if mask is None:
        return None
    import torch

    from stages.core.compat import attention_implementation

    if attention_implementation(decoder) == "eager":
        dtype = decoder.dtype if decoder.dtype.is_floating_point else torch.float32
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask
