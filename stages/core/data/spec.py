"""What to load and where a row sits: the data's names, ``DatasetSpec``, ``Where`` and ``RowError``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from stages.core.config import field
from stages.core.errors import ConfigError, DataError, did_you_mean

# ----------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------

FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text", "preference", "kto")

# Which record form each format turns into (see docs/architecture.md, "Internal record forms").
FORM_OF_FORMAT = {
    "messages": "chat", "sharegpt": "chat", "alpaca": "chat", "prompt_completion": "chat",
    "text": "text", "preference": "preference", "kto": "kto",
}

# The formats each kind of stage can train on.
KIND_FORMATS = {
    "sft": ("messages", "sharegpt", "alpaca", "prompt_completion", "text"),
    "text": ("text",),
    "preference": ("preference",),
    "kto": ("kto",),
    "any": ("messages", "sharegpt", "alpaca", "prompt_completion", "text", "preference", "kto"),  # data check
}

# How auto-detection recognises a format: the first whose keys are all present wins. Preference and
# KTO come before prompt/completion because their rows hold those keys too.
SIGNATURES = (
    ("preference", ("chosen", "rejected")),
    ("kto", ("completion", "label")),
    ("kto", ("messages", "kto_tag")),  # LLaMA-Factory's KTO layout
    ("messages", ("messages",)),
    ("sharegpt", ("conversations",)),
    ("prompt_completion", ("prompt", "completion")),
    ("alpaca", ("instruction", "output")),
    ("text", ("text",)),
)

# Our field names, the keys `DatasetSpec.columns` may map to a file's column names.
FIELDS = ("messages", "conversations", "system", "tools", "instruction", "input", "output", "prompt",
          "completion", "text", "chosen", "rejected", "margin", "score_chosen", "score_rejected",
          "label", "kto_tag")

ROLES = ("system", "user", "assistant", "tool")

# Message keys kept besides role and content (tool use); other keys are dropped.
PASSTHROUGH_KEYS = ("tool_calls", "tool_call_id", "name")

# ShareGPT speaker names (`from`) -> our roles. `function_call` turns become assistant tool calls.
SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "chatgpt": "assistant",
    "system": "system",
    "tool": "tool", "observation": "tool", "function_response": "tool",
    "function_call": "assistant",
}

DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet")

UTF8_BOM = b"\xef\xbb\xbf"

# A longer line is refused (a skippable row fault), so memory stays bounded whatever the file holds.
MAX_LINE_BYTES = 32 << 20

Format = Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text", "preference",
                 "kto"]


# ----------------------------------------------------------------------------------------------
# What to load
# ----------------------------------------------------------------------------------------------

@dataclass
class DatasetSpec:
    """One dataset of a mixture: where it is, how its rows look, and how much of it to use."""

    path: str = field(help="A local .jsonl/.ndjson/.json/.csv/.tsv/.parquet file, a directory "
                           "written by datasets' save_to_disk, or a Hugging Face Hub dataset id "
                           "(tried only when no such local path exists).")
    format: Format = field("auto", help="Row format: auto (detected from the keys of the first record), "
                                        "messages, sharegpt, alpaca, prompt_completion, text, "
                                        "preference or kto.")
    columns: dict[str, str] = field(default_factory=dict,
                                    help="Our field name -> the file's column name, e.g. "
                                         "{messages: conversation}.")
    weight: float | None = field(None, help="Share of the mix relative to the other datasets' weights; "
                                            "the mix keeps the total size of the datasets without "
                                            "`samples`. Set it on all of those or on none (none: each "
                                            "dataset is used once, whole).")
    samples: int | None = field(None, help="Take exactly this many records: a seeded draw without "
                                           "replacement, or whole repeats plus a drawn remainder when "
                                           "the dataset holds fewer.")
    split: str = field("train", help="Split to read from a Hub dataset or a saved DatasetDict.")
    system_prompt: str | None = field(None, help="System message put first in chat records (and "
                                                 "preference/KTO prompts) that have none.")
    drop_duplicates: bool = field(False, help="Drop records identical to an earlier one of the same "
                                              "dataset (duplicates are counted either way).")

    def __post_init__(self):
        self.path = str(self.path)
        if not self.path.strip():
            raise ConfigError("must name a file, a directory or a Hub dataset id", field="path")
        if self.format not in FORMATS:
            raise ConfigError(f"unknown format {self.format!r}; expected one of {', '.join(FORMATS)}",
                              field="format", hint=did_you_mean(str(self.format), FORMATS))
        self._check_columns()
        self._check_amounts()
        if not isinstance(self.split, str) or not self.split.strip():
            raise ConfigError("must name a split, e.g. 'train'", field="split")
        if self.system_prompt is not None and (not isinstance(self.system_prompt, str)
                                               or not self.system_prompt.strip()):
            raise ConfigError("must be a non-empty string, or left out", field="system_prompt")

    def _check_columns(self) -> None:
        if not isinstance(self.columns, dict):
            raise ConfigError(f"expected a mapping, got {type(self.columns).__name__}", field="columns")
        for ours, theirs in self.columns.items():
            if ours not in FIELDS:
                raise ConfigError(f"unknown field '{ours}'; fields that can be mapped: "
                                  f"{', '.join(FIELDS)}", field=f"columns.{ours}",
                                  hint=did_you_mean(str(ours), FIELDS))
            if not isinstance(theirs, str) or not theirs:
                raise ConfigError("must be the name of a column in the file", field=f"columns.{ours}")

    def _check_amounts(self) -> None:
        if self.weight is not None:
            if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) \
                    or not math.isfinite(self.weight) or self.weight <= 0:
                raise ConfigError(f"must be a positive number, got {self.weight!r}", field="weight")
        if self.samples is not None:
            if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
                raise ConfigError(f"must be a positive whole number, got {self.samples!r}",
                                  field="samples")
        if self.weight is not None and self.samples is not None:
            raise ConfigError("set either `samples` (an exact count) or `weight` (a share of the mix), "
                              "not both", field="samples")


# ----------------------------------------------------------------------------------------------
# Where a row sits, and the error for one bad row
# ----------------------------------------------------------------------------------------------

class RowError(DataError):
    """One row that cannot be used. ``category`` is the short reason that ``skip_invalid`` counts."""

    def __init__(self, category: str, message: str, **where: Any):
        self.category = category
        super().__init__(message, **where)


class Where(NamedTuple):
    """The place of a row: a 1-based line for text files, a 0-based row index for the rest.

    A JSON list has both: the line where the record starts and its index in the list. (A named tuple:
    one is made for every row read, in a fraction of a frozen dataclass's time.)
    """

    file: str
    line: int | None = None
    row: int | None = None

    @property
    def source(self) -> str:
        if self.line is not None:
            return f"{self.file}:{self.line}"
        return f"{self.file} row {self.row}"

    def error(self, category: str, message: str, *, field: str | None = None,
              hint: str | None = None) -> RowError:
        if self.row is not None:
            message = f"{'record' if self.line is not None else 'row'} {self.row}: {message}"
        return RowError(category, message, file=self.file, line=self.line, field=field, hint=hint)


def kind_of(value: Any) -> str:
    """A value's type in the words of JSON, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__

