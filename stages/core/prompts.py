"""Prompt datasets with per-row reference columns, for stages that generate and score (GRPO, evaluation).

A row is a prompt plus any other columns a reward reads (``answer`` for exact_match, ``sign_off`` for
ends_with, ...). Accepted rows:
- ``{"prompt": "text", ...}`` or ``{"prompt": [messages ending in a user turn], ...}``;
- ``{"messages": [..., user turn], ...}``; when the messages end with an assistant reply, that reply becomes
  the ``reference`` column and the turns before it the prompt (SFT data doubles as prompt data);
- ``{"prompt": ..., "completion": "text"}``: the completion becomes the ``reference`` column.

Every other key is kept as a column (a row without it gets None). A column may not take a name the trainer
passes itself (``completions``, ``trainer_state``, ...).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from typing import Any

from stages.core.data import DatasetSpec, data_hash, mix, read_rows
from stages.core.errors import DataError
from stages.core.rewards import CALL_CONTEXT

ROLES = ("system", "user", "assistant", "tool")
RESERVED = (*CALL_CONTEXT, "prompt", "completion", "source")


@dataclasses.dataclass
class PromptSet:
    train: list[dict]           # {"prompt": [messages], "source": "file:line", **columns}
    eval: list[dict]
    columns: list[str]          # the reference columns every record carries (None where a row had none)
    data_hashes: dict[str, str]

    def column_values(self, records: Sequence[dict]) -> dict[str, list]:
        """The columns of ``records`` as lists, as a reward takes them."""
        return {name: [record[name] for record in records] for name in self.columns}


def load_prompts(specs: Sequence[DatasetSpec], *, seed: int, eval_count: int = 0) -> PromptSet:
    """Read, mix (by each spec's weight/samples) and shuffle prompt rows; hold out ``eval_count`` for evaluation."""
    if not specs:
        raise DataError("no prompt datasets given: list at least one", field="data.datasets")
    loaded = []
    for spec in specs:
        if spec.format not in ("auto", "messages", "prompt_completion"):
            raise DataError(f"prompt data is read from `prompt` or `messages` rows, not format '{spec.format}'",
                            file=spec.path, field="format")
        records = [_record(where, row, spec) for where, row in _rows(spec)]
        if not records:
            raise DataError("no prompts", file=spec.path)
        loaded.append((spec, records))
    columns = sorted({key for _, records in loaded for record in records for key in record} - {"prompt", "source"})
    for _, records in loaded:
        for record in records:
            for name in columns:
                record.setdefault(name, None)
    _check_column_types(columns, [r for _, records in loaded for r in records])
    mixed = mix(loaded, seed)
    random.Random(seed).shuffle(mixed)
    if eval_count >= len(mixed):
        raise DataError(f"{len(mixed)} prompts cannot spare {eval_count} for evaluation", field="data.eval_prompts",
                        hint="lower data.eval_prompts or add prompts")
    return PromptSet(train=mixed[eval_count:], eval=mixed[:eval_count], columns=columns,
                     data_hashes={spec.path: data_hash(spec.path) for spec in specs})


def _rows(spec: DatasetSpec):
    for where, row in read_rows(spec):
        if isinstance(row, Exception):
            raise row
        yield where, row


def _record(where, row: Any, spec: DatasetSpec) -> dict:
    if not isinstance(row, dict):
        raise where.error("prompt", f"expected a JSON object, got {type(row).__name__}", field="prompt")
    row = {ours: row[theirs] for ours, theirs in spec.columns.items() if theirs in row} | \
        {k: v for k, v in row.items() if k not in spec.columns.values()}
    columns = {k: v for k, v in row.items() if k not in ("prompt", "messages", "completion", "system")}
    for name in columns:
        if name in RESERVED or name == "reference" and ("completion" in row or "messages" in row):
            raise where.error(name, f"column '{name}' is a name the trainer uses itself; rename it", field=name)
    if "messages" in row:
        messages = _messages(where, row["messages"], "messages")
        if messages[-1]["role"] == "assistant":
            columns["reference"] = messages[-1]["content"]
            messages = messages[:-1]
    elif "prompt" in row:
        value = row["prompt"]
        if isinstance(value, str) and value.strip():
            messages = [{"role": "user", "content": value}]
        else:
            messages = _messages(where, value, "prompt")
        if isinstance(row.get("completion"), str):
            columns["reference"] = row["completion"]
    else:
        raise where.error("prompt", "expected a `prompt` (string or message list) or `messages`", field="prompt")
    if not messages or messages[-1]["role"] != "user":
        raise where.error("prompt", "the prompt must end with a user turn", field="prompt")
    system = row.get("system", spec.system_prompt)
    if isinstance(system, str) and system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    return {"prompt": messages, "source": where.source, **columns}


def _messages(where, value: Any, column: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise where.error(column, "expected a non-empty list of {role, content} messages", field=column)
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ROLES or \
                not isinstance(message.get("content"), str):
            raise where.error(column, f"message {index} must be {{role: {'|'.join(ROLES)}, content: str}}",
                              field=f"{column}[{index}]")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _check_column_types(columns: list[str], records: list[dict]) -> None:
    """One type per column (Arrow stores a column with one type); None is allowed anywhere."""
    for name in columns:
        seen: dict[str, str] = {}
        for record in records:
            value = record[name]
            if value is not None:
                seen.setdefault(type(value).__name__, record["source"])
        if len(seen) > 1:
            (first, at_first), (second, at_second) = list(seen.items())[:2]
            raise DataError(f"column '{name}' holds a {first} at {at_first} and a {second} at {at_second}; "
                            "give it one type in every row (or null)", field=name)
