"""Corpus documents -> packed token blocks -> batches (continued pretraining); see ``corpus``'s docstring.

torch is imported only inside ``BlockCollator``.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from stages.core.data.corpus import Block, CorpusReport, CorpusSource, Piece, read_pieces
from stages.core.errors import ConfigError

# ----------------------------------------------------------------------------------------------
# Tokenizing and packing
# ----------------------------------------------------------------------------------------------

def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (a plain callable returning input_ids also works)."""
    if not text:
        return []
    try:
        return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    except TypeError:
        return tokenizer(text)["input_ids"]


def tokenize_pieces(pieces: Iterable[Piece], tokenizer: Any, eos_token_id: int) -> Iterator[Piece]:
    """(token ids, ends_document) for each piece; EOS is appended to the last piece of a document."""
    for text, ends in pieces:
        ids = encode(tokenizer, text)
        if ends:
            ids = [*ids, eos_token_id]
        yield ids, ends


def pack(token_pieces: Iterable[tuple[list[int], bool]], block_size: int) -> Iterator[Block]:
    """Fill blocks of ``block_size`` tokens; ``seq_lengths`` lists the document pieces of each.

    A document that does not fit continues in the next block. The last block may be shorter.
    """
    if block_size < 2:
        raise ConfigError("must be at least 2", field="block_size")
    ids: list[int] = []
    lengths: list[int] = []
    open_piece = False  # whether the last entry of ``lengths`` is a document still being filled
    for tokens, ends in token_pieces:
        start = 0
        while start < len(tokens):
            take = tokens[start:start + block_size - len(ids)]
            start += len(take)
            if open_piece:
                lengths[-1] += len(take)
            else:
                lengths.append(len(take))
                open_piece = True
            ids.extend(take)
            if len(ids) == block_size:
                yield {"input_ids": ids, "seq_lengths": lengths}
                ids, lengths, open_piece = [], [], False
        if ends:
            open_piece = False
    if len(ids) >= 2:
        yield {"input_ids": ids, "seq_lengths": lengths}


def shuffle_buffer(blocks: Iterable[Block], size: int, seed: int) -> Iterator[Block]:
    """Blocks in a seeded random order drawn through a buffer of ``size`` blocks (0 or 1: as they come)."""
    if size <= 1:
        yield from blocks
        return
    rng = random.Random(seed)
    buffer: list[Block] = []
    for block in blocks:
        if len(buffer) < size:
            buffer.append(block)
            continue
        index = rng.randrange(size)
        yield buffer[index]
        buffer[index] = block
    rng.shuffle(buffer)
    yield from buffer


def take_tokens(blocks: Iterable[Block], max_tokens: int | None, *,
                report: CorpusReport | None = None) -> Iterator[Block]:
    """Blocks until ``max_tokens`` tokens have passed; the last one is cut to fit."""
    if max_tokens is None:
        yield from blocks
        return
    left = max_tokens
    for block in blocks:
        if left < 2:
            if report is not None:
                report.budget_reached = True
            return
        if len(block["input_ids"]) > left:
            block = cut_block(block, left)
        left -= len(block["input_ids"])
        yield block


def cut_block(block: Block, size: int) -> Block:
    """The first ``size`` tokens of a block, with its piece lengths to match."""
    lengths, total = [], 0
    for length in block["seq_lengths"]:
        if total >= size:
            break
        lengths.append(min(length, size - total))
        total += lengths[-1]
    return {"input_ids": block["input_ids"][:size], "seq_lengths": lengths}


def is_held_out(index: int, ratio: float, seed: int) -> bool:
    """Seeded, independent choice of block ``index`` for the held-out set."""
    return ratio > 0 and random.Random(seed * 1_000_003 + index).random() < ratio


class PackedCorpus:
    """A corpus as blocks, read afresh on every iteration (re-iterable; memory flat).

    ``held_out`` holds indices (in packing order, before shuffling) of blocks kept out of training:
    ``hold_out`` fills it. ``shuffle`` > 1 draws blocks through a buffer of that many blocks, reseeded
    on every pass; ``max_tokens`` stops each pass after that many tokens.
    """

    def __init__(self, sources: Sequence[CorpusSource], tokenizer: Any, *, block_size: int,
                 eos_token_id: int | None = None, seed: int = 0, shuffle_files: bool = False,
                 shuffle: int = 0, max_tokens: int | None = None):
        if not sources:
            raise ConfigError("no corpus given: list at least one source", field="sources")
        eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        if eos is None:
            raise ConfigError("the tokenizer has no EOS token to put between documents", field="model.name")
        if max_tokens is not None and max_tokens < 2:
            raise ConfigError("must be at least 2 tokens", field="max_tokens")
        self.sources, self.tokenizer, self.block_size, self.eos_token_id = list(sources), tokenizer, block_size, eos
        self.seed, self.shuffle_files, self.shuffle, self.max_tokens = seed, shuffle_files, shuffle, max_tokens
        self.held_out: set[int] = set()
        self.report = CorpusReport()
        self.passes = 0

    def packed(self, report: CorpusReport | None = None) -> Iterator[Block]:
        """All blocks in packing order, nothing held out, shuffled or cut."""
        report = report if report is not None else CorpusReport()
        pieces = read_pieces(self.sources, report=report, seed=self.seed if self.shuffle_files else None)
        return pack(tokenize_pieces(pieces, self.tokenizer, self.eos_token_id), self.block_size)

    def __iter__(self) -> Iterator[Block]:
        report = self.report = CorpusReport(held_out_blocks=len(self.held_out))  # live: counts so far
        self.passes += 1
        blocks = (block for index, block in enumerate(self.packed(report)) if index not in self.held_out)
        blocks = shuffle_buffer(blocks, self.shuffle, self.seed + self.passes)
        for block in take_tokens(blocks, self.max_tokens, report=report):
            report.tokens += len(block["input_ids"])
            report.blocks += 1
            yield block

    def hold_out(self, ratio: float, max_tokens: int) -> list[Block]:
        """Choose held-out blocks (a seeded ``ratio`` of them, at most ``max_tokens`` tokens in all).

        Reads only as far into the corpus as it takes. Blocks are cut at block boundaries, so a
        document may straddle a held-out block and a training block.
        """
        if not 0 < ratio < 1:
            raise ConfigError("must be in (0, 1) to hold out blocks", field="eval_ratio")
        chosen: list[Block] = []
        total = 0
        self.held_out = set()
        for index, block in enumerate(self.packed()):
            if total >= max_tokens:
                break
            if is_held_out(index, ratio, self.seed):
                self.held_out.add(index)
                chosen.append(block)
                total += len(block["input_ids"])
        return chosen


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------

def piece_positions(seq_lengths: Sequence[int]) -> list[int]:
    """Position ids that restart at 0 at every piece: [3, 2] -> [0, 1, 2, 0, 1]."""
    return [position for length in seq_lengths for position in range(length)]


@dataclass
class BlockCollator:
    """Blocks -> a ``[batch, length]`` batch for sdpa/eager attention, with no attention mask.

    ``position_ids`` restart at every document piece, so attention stays inside each document;
    labels are -100 on each piece's first token (never predicted across a boundary) and on padding.
    A shorter block is padded at its end: its padding continues the last piece's positions, and as
    nothing before it can attend forward, it changes nothing. ``tokens`` counts the real tokens seen.
    """

    pad_token_id: int
    tokens: int = 0

    def __call__(self, examples: Sequence[dict]) -> dict[str, Any]:
        import torch

        width = max(len(example["input_ids"]) for example in examples)
        input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), -100, dtype=torch.long)
        position_ids = torch.zeros((len(examples), width), dtype=torch.long)
        for row, example in enumerate(examples):
            ids = torch.as_tensor(example["input_ids"], dtype=torch.long)
            positions = torch.as_tensor(piece_positions(example["seq_lengths"]), dtype=torch.long)
            if len(positions) != len(ids):
                raise ValueError(f"block of {len(ids)} tokens has seq_lengths summing to {len(positions)}")
            length = len(ids)
            input_ids[row, :length] = ids
            labels[row, :length] = torch.where(positions == 0, -100, ids)
            position_ids[row, :length] = positions
            position_ids[row, length:] = positions[-1] + 1 + torch.arange(width - length)
            self.tokens += length
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def blocks_in_batches(blocks: Sequence[Block], batch_size: int) -> Iterator[Sequence[Block]]:
    for start in range(0, len(blocks), batch_size):
        yield blocks[start:start + batch_size]


def to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    return {key: value.to(device) if hasattr(value, "to") else value for key, value in batch.items()}


def count_tokens(blocks: Iterable[Block]) -> int:
    return sum(len(block["input_ids"]) for block in blocks)


def loss_tokens(blocks: Iterable[Block]) -> int:
    """Tokens that carry loss: all but the first of each piece."""
    return sum(len(block["input_ids"]) - len(block["seq_lengths"]) for block in blocks)
