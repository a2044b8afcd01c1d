"""Turning records into training features: token ids plus a loss mask, with truncation accounted for.

Every chat record goes through ``stages.core.chat.assistant_samples``, so the loss falls on assistant
tokens for any template (one sample per assistant turn when the template rewrites earlier turns as the
conversation grows, or only the final turn); text records carry loss on every token. Samples longer than
``max_length`` are truncated (or dropped when nothing loss-bearing survives) and counted, so the
stage can report what it did to the user's data instead of doing it silently.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections import Counter
from collections.abc import Sequence
from typing import Any

from stages.core import compat
from stages.core.errors import DataError, LorelayError


@dataclasses.dataclass
class TokenizeReport:
    """What tokenization did to the records: samples made, truncated, dropped (by reason), tokens."""

    records: int = 0
    history: str = "per_turn"  # how conversations whose template rewrites earlier turns were trained
    history_rewritten: int = 0  # such conversations (each one sample per assistant turn, or its final turn)
    samples: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: Counter = dataclasses.field(default_factory=Counter)
    tokens: int = 0
    loss_tokens: int = 0
    lengths: list[int] = dataclasses.field(default_factory=list)

    def add(self, stats: dict[str, list]) -> None:
        """Count the per-sample columns ``dropped``, ``truncated``, ``rewritten``, ``length``, ``loss_length``."""
        self.samples += len(stats["length"])
        self.truncated += sum(stats["truncated"])
        self.dropped.update(reason for reason in stats["dropped"] if reason)
        kept = [(length, loss) for reason, length, loss in zip(stats["dropped"], stats["length"], stats["loss_length"])
                if not reason]
        self.kept += len(kept)
        self.tokens += sum(length for length, _ in kept)
        self.loss_tokens += sum(loss for _, loss in kept)
        self.lengths.extend(length for length, _ in kept)
        self.history_rewritten += sum(stats["rewritten"])  # set on the first sample of such a conversation

    def summary(self) -> dict:
        lengths = sorted(self.lengths) or [0]
        return {"records": self.records, "samples": self.samples, "kept": self.kept, "truncated": self.truncated,
                "dropped": dict(self.dropped), "tokens": self.tokens, "loss_tokens": self.loss_tokens,
                "length_mean": round(sum(lengths) / len(lengths), 1), "length_max": lengths[-1],
                "length_p95": lengths[int(0.95 * (len(lengths) - 1))],
                "history": {"mode": self.history, "rewritten_conversations": self.history_rewritten,
                            "note": HISTORY_NOTES[self.history]}}


HISTORY_NOTES = {
    "per_turn": "conversations the chat template renders differently as they grow were trained as one "
                "sample per assistant turn, each rendered as the template renders it at that turn",
    "final_turn": "conversations the chat template renders differently as they grow were trained on their "
                  "final assistant turn only",
}


def encode_record(tokenizer, record: dict, *, assistant_only: bool = True) -> tuple[list[int], list[int]]:
    """(input_ids, loss mask) of one chat or text record, as one sequence (see ``encode_samples``)."""
    from stages.core.chat import assistant_mask

    if "messages" in record:
        try:
            ids, mask = assistant_mask(tokenizer, record["messages"], tools=record.get("tools"))
        except LorelayError as err:
            raise _data_error(record, err) from None
        return ids, (mask if assistant_only else [1] * len(ids))
    ids = tokenizer(record["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids, [1] * len(ids)


def encode_samples(tokenizer, record: dict, *, assistant_only: bool = True,
                   history: str = "per_turn") -> tuple[list[tuple[list[int], list[int]]], bool]:
    """The (input_ids, loss mask) samples of one record, and whether the template rewrote its history.

    A chat record is one sample, or one per assistant turn (only the final one with
    ``history="final_turn"``) when the template renders earlier turns differently as the conversation
    grows: see ``stages.core.chat.assistant_samples``.
    """
    from stages.core.chat import assistant_samples

    if "messages" not in record:
        return [encode_record(tokenizer, record)], False
    try:
        samples, rewritten = assistant_samples(tokenizer, record["messages"], tools=record.get("tools"),
                                               history=history)
    except LorelayError as err:
        raise _data_error(record, err) from None
    if not assistant_only:
        samples = [(ids, [1] * len(ids)) for ids, _ in samples]
    return samples, rewritten


def _data_error(record: dict, err: LorelayError) -> DataError:
    return DataError(err.reason, file=_file(record), line=_line(record), hint=err.hint)


def _file(record: dict) -> str | None:
    source = record.get("source")
    return source.rsplit(":", 1)[0] if source else None


def _line(record: dict) -> int | None:
    source = record.get("source") or ""
    tail = source.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else None


def tokenize_records(tokenizer, records: Sequence[dict], *, max_length: int | None, assistant_only: bool = True,
                     truncation_side: str = "right", history: str = "per_turn",
                     num_proc: int | None = None) -> tuple[Any, TokenizeReport]:
    """A ``datasets.Dataset`` with ``input_ids`` and ``assistant_masks`` (TRL's names), and its report.

    Tokenized by ``Dataset.map`` (batched, ``num_proc`` processes) under accelerate's
    ``main_process_first``, as TRL prepares its own datasets. Records travel into the map as JSON
    text: Arrow gives every nested object the keys of all the others, so a tool call's ``arguments``
    would gain the other calls' argument names as nulls, and the template would render them.
    """
    from accelerate import PartialState
    from datasets import Dataset

    rows = Dataset.from_dict({"record": [json.dumps(record, ensure_ascii=False) for record in records]})
    report = TokenizeReport(records=len(rows), history=history)
    if not len(rows):
        return Dataset.from_dict({"input_ids": [], compat.ASSISTANT_MASKS: []}, features=_features(stats=False)), report
    encode = functools.partial(_encode_batch, tokenizer=tokenizer, max_length=max_length,
                               assistant_only=assistant_only, truncation_side=truncation_side, history=history)
    with PartialState().main_process_first():
        encoded = rows.map(encode, batched=True, batch_size=BATCH_ROWS, remove_columns=["record"],
                           num_proc=num_proc if num_proc and num_proc > 1 and len(rows) > BATCH_ROWS else None,
                           features=_features(), desc="tokenizing", load_from_cache_file=False)
    stats = encoded.select_columns(list(_STATS)).to_dict()
    report.add(stats)
    kept = encoded.filter(lambda dropped: [not reason for reason in dropped], input_columns="dropped",
                          batched=True, load_from_cache_file=False) if report.dropped else encoded
    return kept.remove_columns(list(_STATS)), report


BATCH_ROWS = 256
# Per-sample facts the map records beside the tokens, for the report; removed from the dataset.
_STATS = {"dropped": "string", "truncated": "bool", "rewritten": "bool", "length": "int32",
          "loss_length": "int32"}


def _features(*, stats: bool = True):
    from datasets import Features, Sequence as ListOf, Value

    return Features({"input_ids": ListOf(Value("int32")), compat.ASSISTANT_MASKS: ListOf(Value("int8")),
                     **({name: Value(kind) for name, kind in _STATS.items()} if stats else {})})


def _encode_batch(batch: dict, *, tokenizer, max_length: int | None, assistant_only: bool, truncation_side: str,
                  history: str) -> dict[str, list]:
    columns: dict[str, list] = {"input_ids": [], compat.ASSISTANT_MASKS: [], **{name: [] for name in _STATS}}
    for text in batch["record"]:
        record = json.loads(text)
        samples, rewritten = encode_samples(tokenizer, record, assistant_only=assistant_only, history=history)
        for position, (ids, mask) in enumerate(samples):
            truncated = max_length is not None and len(ids) > max_length
            if truncated:
                keep = slice(None, max_length) if truncation_side == "right" else slice(-max_length, None)
                ids, mask = ids[keep], mask[keep]
            loss = sum(mask)
            dropped = "" if loss else ("no loss-bearing tokens after truncation" if truncated
                                       else "no loss-bearing tokens")
            for name, value in (("input_ids", ids), (compat.ASSISTANT_MASKS, mask), ("dropped", dropped),
                                ("truncated", truncated), ("rewritten", rewritten and position == 0), ("length", len(ids)),
                                ("loss_length", loss)):
                columns[name].append(value)
    return columns


def text_completion_tokens(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """``(input_ids, mask)`` of ``prompt + completion`` + EOS, mask 1 on the completion and the EOS.

    Tokenized as one string (as the model reads it), with the tokenizer's own BOS; a token that
    straddles the boundary is trained on, as in ``stages.core.chat.assistant_mask``.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token, so a completion cannot be taught to end",
                           hint="set tokenizer.eos_token")
    encoding = tokenizer(prompt + completion, add_special_tokens=True, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    boundary = len(prompt)
    # Tokens the tokenizer adds itself (BOS) have empty offsets (0, 0), so they stay 0.
    mask = [int(token_end > boundary) for _, token_end in encoding["offset_mapping"]]
    if ids and ids[-1] == eos:
        mask[-1] = 1  # the tokenizer (or the completion itself) already ends with EOS
    else:
        ids.append(eos)
        mask.append(1)
    return ids, mask
