"""Preference losses on per-sequence values: DPO (TRL's loss types), ORPO, KTO and the reward-model pair loss.

Each takes summed log-probs (and scored-token counts where a loss normalises by length), so it is the same
whether those came from padded rows or from packed ones. The formulas are TRL 1.16's (``DPOTrainer``,
``experimental.orpo.ORPOTrainer``, ``KTOTrainer``, ``RewardTrainer``) for the standard reverse-KL
divergence, no WPO weighting and no length desensitisation (LD-DPO); ``dpo_loss`` raises on anything else
and ``DPO_PACKED_LOSSES`` lists what it computes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

DPO_PACKED_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                     "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


@dataclasses.dataclass
class PairLogps:
    """Summed log-probs and scored-token counts of chosen and rejected replies, (B,) each."""

    chosen: Any
    rejected: Any
    chosen_tokens: Any
    rejected_tokens: Any

    @classmethod
    def split(cls, logps, tokens) -> "PairLogps":
        """From (2B,) values ordered chosen first, then rejected (the collators' sequence order)."""
        chosen, rejected = logps.chunk(2)
        chosen_tokens, rejected_tokens = tokens.chunk(2)
        return cls(chosen, rejected, chosen_tokens, rejected_tokens)


def dpo_loss(policy: PairLogps, ref_chosen, ref_rejected, *, beta: float, loss_types=("sigmoid",),
             loss_weights=None, label_smoothing: float = 0.0, discopop_tau: float = 0.05):
    """Weighted sum of the mean per-pair losses, as ``DPOTrainer`` computes it."""
    import torch
    import torch.nn.functional as F

    chosen_ratio = policy.chosen - ref_chosen
    rejected_ratio = policy.rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    chosen_length = policy.chosen_tokens.clamp(min=1)
    rejected_length = policy.rejected_tokens.clamp(min=1)
    total = 0.0
    for loss_type, weight in zip(loss_types, loss_weights or [1.0] * len(loss_types), strict=True):
        if loss_type == "sigmoid":
            per_pair = -F.logsigmoid(beta * delta)
        elif loss_type == "hinge":
            per_pair = torch.relu(1 - beta * delta)
        elif loss_type == "ipo":
            per_pair = (chosen_ratio / chosen_length - rejected_ratio / rejected_length - 1 / (2 * beta)) ** 2
        elif loss_type == "exo_pair":
            epsilon = torch.tensor(label_smoothing, device=delta.device)
            per_pair = (torch.sigmoid(beta * delta) * (F.logsigmoid(beta * delta) - torch.log1p(-epsilon))
                        + torch.sigmoid(-beta * delta) * (F.logsigmoid(-beta * delta) - torch.log(epsilon)))
        elif loss_type == "nca_pair":
            per_pair = (-F.logsigmoid(beta * chosen_ratio) - 0.5 * F.logsigmoid(-beta * chosen_ratio)
                        - 0.5 * F.logsigmoid(-beta * rejected_ratio))
        elif loss_type == "robust":
            per_pair = ((-(1 - label_smoothing) * F.logsigmoid(beta * delta)
                         + label_smoothing * F.logsigmoid(-beta * delta)) / (1 - 2 * label_smoothing))
        elif loss_type == "bco_pair":
            per_pair = -F.logsigmoid(beta * chosen_ratio) - F.logsigmoid(-beta * rejected_ratio)
        elif loss_type == "sppo_hard":
            per_pair = (chosen_ratio - 0.5 / beta) ** 2 + (rejected_ratio + 0.5 / beta) ** 2
        elif loss_type in ("aot", "aot_unpaired"):
            if loss_type == "aot":
                sorted_delta = (torch.sort(policy.chosen - policy.rejected).values
                                - torch.sort(ref_chosen - ref_rejected).values)
            else:
                sorted_delta = torch.sort(chosen_ratio).values - torch.sort(rejected_ratio).values
            per_pair = (-F.logsigmoid(beta * sorted_delta) * (1 - label_smoothing)
                        - F.logsigmoid(-beta * sorted_delta) * label_smoothing)
        elif loss_type == "apo_zero":
            per_pair = 1 - torch.sigmoid(beta * chosen_ratio) + torch.sigmoid(beta * rejected_ratio)
        elif loss_type == "apo_down":
            per_pair = torch.sigmoid(beta * chosen_ratio) + 1 - torch.sigmoid(beta * delta)
        elif loss_type == "discopop":
            logits = beta * delta
            modulation = torch.sigmoid(logits / discopop_tau)
            per_pair = -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation
        elif loss_type == "sft":
            per_pair = (-policy.chosen.sum() / policy.chosen_tokens.sum().clamp(min=1)).expand(delta.shape[0])
        elif loss_type == "sigmoid_norm":
            per_pair = -F.logsigmoid(beta * (chosen_ratio / chosen_length - rejected_ratio / rejected_length))
        else:
            raise ValueError(f"the packed DPO loss has no '{loss_type}'; it has {', '.join(DPO_PACKED_LOSSES)}")
        total = total + per_pair.mean() * weight
    return total


def orpo_loss(policy: PairLogps, prompt_logps, prompt_tokens, *, beta: float):
    """(loss, log-odds, NLL) of ORPO as ``ORPOTrainer`` computes it: the NLL per token of prompt + chosen reply
    (its NLL covers the prompt too: ``prompt_logps``/``prompt_tokens`` per pair) minus beta x log sigmoid of
    the log odds of the length-averaged reply log-probs."""
    import torch
    import torch.nn.functional as F

    def log1mexp(x):  # log(1 - exp(x)), stable on both sides of -ln 2
        return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))

    chosen = policy.chosen / policy.chosen_tokens.clamp(min=1)
    rejected = policy.rejected / policy.rejected_tokens.clamp(min=1)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    nll = -(policy.chosen.sum() + prompt_logps.sum()) / (policy.chosen_tokens.sum() + prompt_tokens.sum()).clamp(min=1)
    return nll - (beta * F.logsigmoid(log_odds)).mean(), log_odds, nll


def kto_loss(logps, ref_logps, desirable, kl_logps=None, ref_kl_logps=None, *, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0, loss_type: str = "kto", kl=None):
    """Mean KTO loss over a micro-batch of unpaired completions (``desirable`` a bool (B,) tensor); the KL
    estimate from mismatched completions is clamped at 0 and carries no gradient, as in ``KTOTrainer``.
    ``kl``: that estimate already made (TRL averages it over processes), instead of from ``kl_logps``."""
    import torch

    ratio = logps - ref_logps
    if loss_type == "kto":
        if kl is None:
            kl = (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
        chosen = 1 - torch.sigmoid(beta * (ratio[desirable] - kl))
        rejected = 1 - torch.sigmoid(beta * (kl - ratio[~desirable]))
    elif loss_type == "apo_zero_unpaired":
        chosen = 1 - torch.sigmoid(beta * ratio[desirable])
        rejected = torch.sigmoid(beta * ratio[~desirable])
    else:
        raise ValueError(f"unknown KTO loss {loss_type!r}")
    return torch.cat((desirable_weight * chosen, undesirable_weight * rejected)).nanmean()


def reward_pair_loss(chosen_scores, rejected_scores, margin=None, center_rewards_coefficient: float | None = None):
    """Bradley-Terry loss of a reward model on pairs, with an optional margin and reward centring
    (``RewardTrainer``)."""
    import torch.nn.functional as F

    difference = chosen_scores - rejected_scores
    if margin is not None:
        difference = difference - margin
    loss = -F.logsigmoid(difference).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * ((chosen_scores + rejected_scores) ** 2).mean()
    return loss


