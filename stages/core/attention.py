"""``sdpa_packed``: PyTorch's sdpa, run once per independent block of a packed row.

A padding-free batch puts several sequences in one row; transformers separates them with a boolean mask
(``position_ids`` restart per sequence, or lorelay's preference rows carry their own block mask). Dense
kernels compute every (query, key) pair they are given, masked or not, and a masked sdpa call cannot take
the causal fast path: on CPU, attention over a row of 8 sequences of 400 tokens costs ~6x its useful work and
keeps a (heads x row x row) score tensor per layer for the backward. Flash-attention's varlen kernels avoid it
on CUDA; TRL's padding-free SFT runs sdpa over the whole row everywhere else (flex-attention, which would skip
masked blocks, has no backward on CPU).

This kernel reads the independent blocks off the mask transformers built (rows attend only inside their
block) and runs sdpa on each block alone: ``is_causal=True`` where the block's mask is plain causal (the fast
kernel), the block's own slice of the mask otherwise (a reply sharing its prompt). The result is the same
attention, exactly: no query attends outside its block. Anything else (no mask, one block, a batch mixing
rows, decoding with a cache, tracing under ``torch.compile``) goes to transformers' sdpa unchanged.

The block structure is computed once per mask, not once per layer: every layer gets the same mask tensor.
"""

from __future__ import annotations

import weakref
from typing import Any

NAME = "sdpa_packed"

# (weak reference to the last mask, its blocks per row): every layer of a forward gets the same mask tensor
_last_mask: tuple[Any, Any] | None = None


def register() -> str:
    """Make ``attn_implementation="sdpa_packed"`` known to transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the same mask sdpa gets; the blocks are read off it
    return NAME


def packed_sdpa_attention(module, query, key, value, attention_mask, **kwargs) -> tuple[Any, None]:
    """transformers' attention-function signature: query/key/value ``(batch, heads, length, dim)``; returns
    ``((batch, length, heads, dim), None)`` as ``sdpa_attention_forward`` does."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    blocks = _blocks_of(attention_mask, query, key, kwargs)
    if blocks is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rows = []
    for row, row_blocks in enumerate(blocks):
        pieces = []
        for start, end, causal in row_blocks:
            piece = slice(start, end)
            mask = None if causal else attention_mask[row:row + 1, :, piece, piece]
            out, _ = sdpa_attention_forward(module, query[row:row + 1, :, piece], key[row:row + 1, :, piece],
                                            value[row:row + 1, :, piece], mask, **kwargs)
            pieces.append(out)
        rows.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1))
    return (rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)), None


def _blocks_of(mask, query, key, kwargs) -> list[list[tuple[int, int, bool]]] | None:
    """Per batch row, its blocks ``(start, end, plain causal)``; None where the row should go to sdpa whole."""
    global _last_mask
    import torch

    if (mask is None or not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.ndim != 4
            or mask.shape[1] != 1 or query.shape[2] != key.shape[2] or mask.shape[-1] != key.shape[2]
            or mask.shape[0] != query.shape[0] or kwargs.get("position_bias") is not None
            or kwargs.get("s_aux") is not None or torch.compiler.is_compiling()):
        return None
    if _last_mask is not None and _last_mask[0]() is mask:
        return _last_mask[1]
    blocks = [independent_blocks(mask[row, 0]) for row in range(mask.shape[0])]
    if all(row_blocks is None or len(row_blocks) < 2 for row_blocks in blocks):
        blocks = None
    else:
        length = mask.shape[-1]
        blocks = [row_blocks or [(0, length, False)] for row_blocks in blocks]
    _last_mask = (weakref.ref(mask), blocks)
    return blocks


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
    blocks = []
    for start, end in zip(edges[:-1], edges[1:]):
        causal = torch.ones(end - start, end - start, dtype=torch.bool, device=mask.device).tril_()
        blocks.append((start, end, bool(torch.equal(mask[start:end, start:end], causal))))
    return blocks
