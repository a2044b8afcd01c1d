"""Turning records into training features: token ids plus a loss mask, with truncation accounted for.

Every chat record goes through ``stages.core.chat.assistant_mask``, so the loss falls on assistant
tokens for any template; text records carry loss on every token. Samples longer than
``max_length`` are truncated (or dropped when nothing loss-bearing survives) and counted, so the
stage can report what it did to the user's data instead of doing it silently.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable

from stages.core.errors import DataError, LorelayError


@dataclasses.dataclass
class TokenizeReport:
    samples: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: Counter = dataclasses.field(default_factory=Counter)
    tokens: int = 0
    loss_tokens: int = 0
    lengths: list[int] = dataclasses.field(default_factory=list)

    def summary(self) -> dict:
        lengths = sorted(self.lengths) or [0]
        return {"samples": self.samples, "kept": self.kept, "truncated": self.truncated,
                "dropped": dict(self.dropped), "tokens": self.tokens, "loss_tokens": self.loss_tokens,
                "length_mean": round(sum(lengths) / len(lengths), 1), "length_max": lengths[-1],
                "length_p95": lengths[int(0.95 * (len(lengths) - 1))]}


def encode_record(tokenizer, record: dict, *, assistant_only: bool = True) -> tuple[list[int], list[int]]:
    """(input_ids, loss mask) of one chat or text record."""
    from stages.core.chat import assistant_mask

    if "messages" in record:
        try:
            ids, mask = assistant_mask(tokenizer, record["messages"], tools=record.get("tools"))
        except LorelayError as err:
            raise DataError(err.reason, file=_file(record), line=_line(record), hint=err.hint) from None
        return ids, (mask if assistant_only else [1] * len(ids))
    ids = tokenizer(record["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids, [1] * len(ids)


def _file(record: dict) -> str | None:
    source = record.get("source")
    return source.rsplit(":", 1)[0] if source else None


def _line(record: dict) -> int | None:
    source = record.get("source") or ""
    tail = source.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else None


def tokenize_records(tokenizer, records: Iterable[dict], *, max_length: int | None,
                     assistant_only: bool = True, truncation_side: str = "right") -> tuple[dict, TokenizeReport]:
    """Columns ``input_ids`` and ``assistant_masks`` (TRL's name) for a ``datasets.Dataset``."""
    report = TokenizeReport()
    columns: dict[str, list] = {"input_ids": [], "assistant_masks": []}
    for record in records:
        report.samples += 1
        ids, mask = encode_record(tokenizer, record, assistant_only=assistant_only)
        if max_length is not None and len(ids) > max_length:
            report.truncated += 1
            keep = slice(None, max_length) if truncation_side == "right" else slice(-max_length, None)
            ids, mask = ids[keep], mask[keep]
        if sum(mask) == 0:
            report.dropped["no loss-bearing tokens after truncation" if report.truncated else "no loss-bearing tokens"] += 1
            continue
        columns["input_ids"].append(ids)
        columns["assistant_masks"].append(mask)
        report.kept += 1
        report.tokens += len(ids)
        report.loss_tokens += sum(mask)
        report.lengths.append(len(ids))
    return columns, report
