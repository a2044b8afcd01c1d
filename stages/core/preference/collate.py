"""Packed preference rows: every sequence of a micro-batch in one row, each prompt once, no padding.

A *group* is a prompt followed by the replies that continue it (DPO: chosen and rejected; KTO: the
completion and its mismatched KL completion; the reward model: chosen and rejected). In the row a reply
attends to its prompt and to itself, never to a sibling reply or another group, and its position ids
continue from the prompt's end, so each reply sees exactly what it would see alone after its prompt.
Where the prompts of two replies differ after truncation (``keep_end`` cutting the prompt's start), each
reply gets its own group: nothing is shared that is not the same.

The attention pattern is a boolean ``(1, 1, T, T)`` mask (True = attend), which transformers hands to sdpa
and eager attention as it is. Kernels that take no mask (flash-attention) get ``share_prompt=False``: one
group per sequence and no mask, so the kernel separates sequences by their restarting position ids.

Scored positions: a completion token is predicted by the hidden state of the token before it *in its own
sequence*: the prompt's last token for a reply's first token (so that hidden state is scored once per
reply), the previous reply token otherwise. Sequences are numbered in the order they are given (for pairs:
every chosen first, then every rejected, as TRL orders its padded batch).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from stages.core import compat

# Attention implementations that take an arbitrary (1, 1, T, T) mask, so a reply can skip its sibling.
MASKED_ATTENTION = ("sdpa_packed", "sdpa", "eager")


@dataclasses.dataclass
class Reply:
    tokens: list[int]
    scored: list[bool]            # per token: does its log-prob count (completion tokens)
    sequence: int                 # index of the sequence it ends (chosen i -> i, rejected i -> n + i)


@dataclasses.dataclass
class Group:
    prompt: list[int]
    replies: list[Reply]
    prompt_sequence: int | None = None   # score the prompt's own tokens as this sequence (ORPO's NLL)


def truncate(prompt: list[int], completion: list[int], max_length: int | None,
             mode: str = "keep_start") -> tuple[list[int], list[int], list[bool]]:
    """(prompt part, completion part, scored) of one sequence cut as TRL's preference collators cut it."""
    tokens = prompt + completion
    scored = [False] * len(prompt) + [True] * len(completion)
    if max_length is not None and len(tokens) > max_length:
        if mode == "keep_start":
            tokens, scored = tokens[:max_length], scored[:max_length]
        elif mode == "keep_end":
            tokens, scored = tokens[-max_length:], scored[-max_length:]
        else:
            raise ValueError(f"unsupported truncation mode {mode!r}: expected keep_start or keep_end")
    cut = len(prompt) if mode == "keep_start" else max(0, len(prompt) - (len(prompt) + len(completion) - len(tokens)))
    return tokens[:cut], tokens[cut:], scored[cut:]


def pair_groups(examples: list[dict], *, max_length: int | None = None, truncation_mode: str = "keep_start",
                share_prompt: bool = True, score_prompt: bool = False) -> list[Group]:
    """Groups of tokenized pairs: chosen i is sequence i, rejected i is sequence n + i; with
    ``score_prompt`` (ORPO's NLL covers the prompt), the prompt of chosen i is sequence 2n + i."""
    sides = [tuple(truncate(example[compat.PROMPT_IDS], example[key], max_length, truncation_mode)
                   for key in (compat.CHOSEN_IDS, compat.REJECTED_IDS)) for example in examples]
    return groups_of_sides(sides, share_prompt=share_prompt, score_prompt=score_prompt)


Side = tuple[list[int], list[int], list[bool]]  # (prompt part, completion part, scored) of one sequence


def groups_of_sides(pairs: list[tuple[Side, Side]], *, share_prompt: bool = True,
                    score_prompt: bool = False) -> list[Group]:
    """Groups of (chosen, rejected) sequences already cut into prompt and completion: one group per pair where
    both prompts are the same (and ``share_prompt``), else one each. Numbered as ``pair_groups`` numbers them."""
    n = len(pairs)
    groups = []
    for i, sides in enumerate(pairs):
        replies = [Reply(completion, scored, sequence) for (_, completion, scored), sequence in zip(sides, (i, n + i))]
        prompt_sequence = 2 * n + i if score_prompt else None
        if share_prompt and sides[0][0] == sides[1][0]:
            groups.append(Group(sides[0][0], replies, prompt_sequence))
        else:
            groups.append(Group(sides[0][0], replies[:1], prompt_sequence))
            groups.append(Group(sides[1][0], replies[1:]))
    return groups


def unpaired_groups(examples: list[dict], *, max_length: int | None = None, truncation_mode: str = "keep_start",
                    share_prompt: bool = True, extra_key: str | None = None) -> list[Group]:
    """Groups of single completions (KTO): completion i is sequence i; ``extra_key`` (the KL completion of
    the same prompt) is sequence n + i, sharing the prompt."""
    n = len(examples)
    keys = [compat.KTO_COMPLETION_IDS] + ([extra_key] if extra_key else [])
    groups = []
    for i, example in enumerate(examples):
        sides = [truncate(example[compat.PROMPT_IDS], example[key], max_length, truncation_mode) for key in keys]
        replies = [Reply(completion, scored, i + k * n) for k, (_, completion, scored) in enumerate(sides)]
        if share_prompt and all(side[0] == sides[0][0] for side in sides):
            groups.append(Group(sides[0][0], replies))
        else:
            groups.extend(Group(prompt, [reply]) for (prompt, _, _), reply in zip(sides, replies))
    return groups


def pack(groups: list[Group], *, with_mask: bool = True) -> dict[str, Any]:
    """One row holding every group, and where each sequence's scored tokens and last token are.

    Returns ``input_ids`` and ``position_ids`` (1, T); ``attention_mask`` (1, 1, T, T) bool, or None when
    ``with_mask`` is False (only valid when no group shares a prompt); ``score_positions``,
    ``score_targets``, ``score_sequences`` (N,): row position whose hidden state predicts each scored
    token, that token, and its sequence; ``sequence_ends`` (S,): the row position of each sequence's last
    token; ``sequence_tokens`` (S,): scored tokens per sequence; ``group_starts`` (G + 1,): where each
    group begins, and the row's end (no attention crosses them, so the row can be run in pieces).
    """
    import torch

    tokens: list[int] = []
    positions: list[int] = []
    group_of: list[int] = []
    branch_of: list[int] = []     # -1: a prompt token (every reply of the group sees it)
    score_positions: list[int] = []
    score_targets: list[int] = []
    score_sequences: list[int] = []
    sequences = 1 + max(max(reply.sequence for group in groups for reply in group.replies),
                        max((g.prompt_sequence for g in groups if g.prompt_sequence is not None), default=-1))
    ends = [0] * sequences
    counts = [0] * sequences
    group_starts: list[int] = []
    for g, group in enumerate(groups):
        if not with_mask and len(group.replies) > 1:
            raise ValueError("a group shares its prompt between replies: that needs the attention mask")
        start = len(tokens)
        group_starts.append(start)
        tokens += group.prompt
        positions += range(len(group.prompt))
        group_of += [g] * len(group.prompt)
        branch_of += [-1] * len(group.prompt)
        prompt_end = len(tokens) - 1 if group.prompt else None
        if group.prompt_sequence is not None:
            for j in range(1, len(group.prompt)):
                score_positions.append(start + j - 1)
                score_targets.append(group.prompt[j])
                score_sequences.append(group.prompt_sequence)
                counts[group.prompt_sequence] += 1
        for reply in group.replies:
            offset = len(tokens)
            tokens += reply.tokens
            positions += range(len(group.prompt), len(group.prompt) + len(reply.tokens))
            group_of += [g] * len(reply.tokens)
            branch_of += [offset] * len(reply.tokens)
            for j, (token, scored) in enumerate(zip(reply.tokens, reply.scored)):
                before = prompt_end if j == 0 else offset + j - 1
                if scored and before is not None:
                    score_positions.append(before)
                    score_targets.append(token)
                    score_sequences.append(reply.sequence)
                    counts[reply.sequence] += 1
            ends[reply.sequence] = len(tokens) - 1 if reply.tokens else (prompt_end if prompt_end is not None else start)
    batch: dict[str, Any] = {
        "input_ids": torch.tensor([tokens], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "attention_mask": None,
        "score_positions": torch.tensor(score_positions, dtype=torch.long),
        "score_targets": torch.tensor(score_targets, dtype=torch.long),
        "score_sequences": torch.tensor(score_sequences, dtype=torch.long),
        "sequence_ends": torch.tensor(ends, dtype=torch.long),
        "sequence_tokens": torch.tensor(counts, dtype=torch.long),
        "group_starts": torch.tensor(group_starts + [len(tokens)], dtype=torch.long),
    }
    if with_mask:
        batch["attention_mask"] = block_mask(torch.tensor(group_of), torch.tensor(branch_of))
    return batch


def block_mask(group_of, branch_of):
    """(1, 1, T, T) bool: token i sees token j when both are in one group, j is not after i, and j is a
    prompt token or in i's own reply."""
    import torch

    index = torch.arange(group_of.numel())
    same_group = group_of[:, None] == group_of[None, :]
    visible = (branch_of[None, :] == -1) | (branch_of[:, None] == branch_of[None, :])
    causal = index[None, :] <= index[:, None]
    return (same_group & visible & causal)[None, None]


@dataclasses.dataclass
class PackedPairCollator:
    """TRL's tokenized pairs (``prompt_ids``, ``chosen_ids``, ``rejected_ids``) -> one packed row.

    Drop-in for TRL's ``DataCollatorForPreference``: the same truncation, and the precomputed reference
    log-probs (``ref_chosen_logps``/``ref_rejected_logps``) passed through.
    """

    max_length: int | None = None
    truncation_mode: str = "keep_start"
    share_prompt: bool = True

    def __call__(self, examples: list[dict]) -> dict[str, Any]:
        import torch

        groups = pair_groups(examples, max_length=self.max_length, truncation_mode=self.truncation_mode,
                             share_prompt=self.share_prompt)
        batch = pack(groups, with_mask=self.share_prompt)
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([example[key] for example in examples])
        return batch
