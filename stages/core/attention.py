"""``sdpa_packed``: PyTorch's sdpa, run once per independent block of a packed row.

A padding-free batch puts several sequences in one row; transformers separates them with a boolean mask
(``position_ids`` restart per sequence, or lorelay's preference rows carry their own block mask). Dense
kernels compute every (query, key) pair they are given, masked or not, and a masked sdpa call cannot take
the causal fast path: on CPU, attention over a row of 8 sequences of 400 tokens costs ~6x its useful work and
keeps a (heads x row x row) score tensor per layer for the backward. Flash-attention's varlen kernels avoid it
on CUDA; TRL's padding-free SFT runs sdpa over the whole row everywhere else (flex-attention, which would skip
masked blocks, has no backward on CPU).

This kernel reads the independent blocks off the mask transformers built (rows attend only inside their
block) and runs sdpa on each block alone, ``is_causal=True`` where the block's mask is plain causal (the fast
kernel). A block that is not (a prompt, its chosen reply, its rejected reply that sees the prompt but not the
chosen one) runs as two calls: the plain causal rows at its start (prompt and first reply) on the fast path,
and the other replies against only the keys they attend (the prompt and themselves), under that slice of the
mask. The result is the same attention, exactly: every query sees the same keys with the same scores.
Anything else (no mask, one plain causal row, padded rows, decoding with a cache, tracing under
``torch.compile``) goes to transformers' sdpa unchanged.

The block structure is computed once per mask, not once per layer: every layer gets the same mask tensor.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

NAME = "sdpa_packed"

# (weak reference to the last mask, its calls per row): every layer of a forward gets the same mask tensor
_last_mask: tuple[Any, Any] | None = None


def register() -> str:
    """Make ``attn_implementation="sdpa_packed"`` known to transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the same mask sdpa gets; the blocks are read off it
    return NAME


@dataclasses.dataclass(frozen=True)
class Call:
    """One sdpa call of a row's plan: ``queries`` attend ``keys`` (a span, or a tensor of key positions)."""

    queries: slice
    keys: Any
    mask: Any  # None: plain causal (queries and keys the same span); else the (1, 1, queries, keys) bool mask


def packed_sdpa_attention(module, query, key, value, attention_mask, **kwargs) -> tuple[Any, None]:
    """transformers' attention-function signature: query/key/value ``(batch, heads, length, dim)``; returns
    ``((batch, length, heads, dim), None)`` as ``sdpa_attention_forward`` does."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plans = _plans_of(attention_mask, query, key, kwargs)
    if plans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rows = []
    for row, calls in enumerate(plans):
        row_keys, row_values = key[row:row + 1], value[row:row + 1]
        pieces = []
        for call in calls:
            if isinstance(call.keys, slice):
                keys, values = row_keys[:, :, call.keys], row_values[:, :, call.keys]
            else:
                keys, values = row_keys.index_select(2, call.keys), row_values.index_select(2, call.keys)
            out, _ = sdpa_attention_forward(module, query[row:row + 1, :, call.queries], keys, values, call.mask,
                                            **kwargs)
            pieces.append(out)
        rows.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1))
    return (rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)), None


def _plans_of(mask, query, key, kwargs) -> list[list[Call]] | None:
    """Per batch row, its sdpa calls; None where the whole batch should go to sdpa as it is."""
    global _last_mask
    import torch

    if (mask is None or not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.ndim != 4
            or mask.shape[1] != 1 or query.shape[2] != key.shape[2] or mask.shape[-1] != key.shape[2]
            or mask.shape[0] != query.shape[0] or kwargs.get("position_bias") is not None
            or kwargs.get("s_aux") is not None or torch.compiler.is_compiling()):
        return None
    if _last_mask is not None and _last_mask[0]() is mask:
        return _last_mask[1]
    plans = [row_plan(mask[row, 0]) for row in range(mask.shape[0])]
    length = mask.shape[-1]
    whole = slice(0, length)
    if all(len(calls) == 1 and isinstance(calls[0].keys, slice) and calls[0].keys == calls[0].queries == whole
           for calls in plans):
        plans = None  # nothing to split: sdpa's own call is the same
    _last_mask = (weakref.ref(mask), plans)
    return plans


def row_plan(mask) -> list[Call]:
    """The sdpa calls that compute attention under the square boolean ``mask`` (True = attend) of one row.

    One call per independent block (``independent_blocks``): plain causal where the block is. A block that is
    not (a prompt followed by replies that each see the prompt and themselves) splits once more: its leading
    rows that are plain causal from the block's start (the prompt and the first reply) are one causal call, and
    the remaining rows attend only the keys any of them attends (the prompt and their own reply, not the first
    reply), under their slice of the mask.
    """
    length = mask.shape[-1]
    blocks = independent_blocks(mask)
    if blocks is None:
        return [Call(slice(0, length), slice(0, length), mask[None, None])]
    calls = []
    for start, end, causal in blocks:
        span = slice(start, end)
        if causal:
            calls.append(Call(span, span, None))
            continue
        block = mask[span, span]
        prefix = causal_prefix(block)
        if prefix:
            calls.append(Call(slice(start, start + prefix), slice(start, start + prefix), None))
        rest = block[prefix:]
        keys = rest.any(dim=0).nonzero()[:, 0]
        calls.append(Call(slice(start + prefix, end), keys + start, rest.index_select(1, keys)[None, None]))
    return calls


def causal_prefix(block) -> int:
    """How many leading rows of a square block mask are plain causal (row i attends exactly keys 0..i)."""
    import torch

    causal = torch.ones(block.shape, dtype=torch.bool, device=block.device).tril_()
    return int((block == causal).all(dim=-1).to(torch.int32).cumprod(0).sum())


def independent_blocks(mask) -> list[tuple[int, int, bool]] | None:
    """The blocks of a square boolean mask (True = attend) that attend only inside themselves.

    A boundary ``b`` splits the row where no query at or after ``b`` attends a key before it and no query
    before ``b`` attends a key at or after it. None where some query attends nothing (sdpa's answer for such a
    row is its own business). Each block says whether its mask is exactly causal.
    """
    import torch

    length = mask.shape[-1]
    attends = mask.to(torch.uint8)
    if not bool(attends.any(dim=-1).all()):
        return None
    first_key = attends.argmax(dim=-1)                                  # first attended key of each query
    last_key = length - 1 - attends.flip(-1).argmax(dim=-1)             # last attended key of each query
    later_first = first_key.flip(0).cummin(0).values.flip(0)            # min first key over queries >= b
    earlier_last = last_key.cummax(0).values                            # max last key over queries <= b
    positions = torch.arange(1, length, device=mask.device)
    cuts = positions[(later_first[1:] >= positions) & (earlier_last[:-1] < positions)].tolist()
    edges = [0, *cuts, length]
    return [(start, end, causal_prefix(mask[start:end, start:end]) == end - start)
            for start, end in zip(edges[:-1], edges[1:])]
