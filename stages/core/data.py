"""Training data in, internal records out.

A ``DatasetSpec`` names a local file (JSONL, JSON, CSV/TSV, Parquet), a directory written by
``datasets``' ``save_to_disk``, or a Hugging Face Hub dataset id. ``load_records`` reads it row by
row, detects the format from the keys of the first record (or takes the declared one), converts each
row to one of the record forms in docs/architecture.md and checks it on the way. Every record keeps
``"source"``: ``"file:LINE"`` for files with lines, ``"file row N"`` (N from 0) for the others.

Faults in the data are ``DataError``s that name the file, the line and the field. A fault confined
to one row is a ``RowError``: ``skip_invalid=True`` skips such rows and counts them by reason
instead of stopping. Faults of the whole file (missing, empty, unreadable, unknown format) always stop.

Data is parsed, never executed (JSON, CSV, Arrow; no pickle, no ``eval``). torch and transformers are
not imported here, and ``datasets``/``pyarrow`` only inside the readers that need them, so
``lorelay data check`` starts fast.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

from stages.core.config import field
from stages.core.errors import ConfigError, DataError, closest, did_you_mean

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
}

# How auto-detection recognises a format: the first whose keys are all present wins. Preference and
# KTO come before prompt/completion because their rows hold those keys too.
SIGNATURES = (
    ("preference", ("chosen", "rejected")),
    ("kto", ("completion", "label")),
    ("messages", ("messages",)),
    ("sharegpt", ("conversations",)),
    ("prompt_completion", ("prompt", "completion")),
    ("alpaca", ("instruction", "output")),
    ("text", ("text",)),
)

# Our field names, the keys `DatasetSpec.columns` may map to a file's column names.
FIELDS = ("messages", "conversations", "system", "tools", "instruction", "input", "output", "prompt",
          "completion", "text", "chosen", "rejected", "margin", "score_chosen", "score_rejected",
          "label")

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


@dataclass(frozen=True)
class Where:
    """The place of a row: a 1-based line for text files, a 0-based row index for the rest.

    A JSON list has both: the line where the record starts and its index in the list.
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


def _kind_of(value: Any) -> str:
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


# ----------------------------------------------------------------------------------------------
# Readers: each yields (Where, value), where value is a parsed row or the RowError that parsing it
# raised. File-wide faults are raised as DataError.
# ----------------------------------------------------------------------------------------------

Rows = Iterator[tuple[Where, Any]]


def read_rows(spec: DatasetSpec) -> Rows:
    """The raw rows of ``spec.path``, whatever holds them."""
    path = Path(spec.path).expanduser()
    if path.is_dir():
        return _read_saved_dataset(path, spec.path, spec.split)
    if path.is_file():
        return _read_file(path, spec.path)
    if path.exists():
        raise DataError("is not a regular file or directory", file=spec.path)
    if _looks_like_hub_id(spec.path):
        return _read_hub(spec.path, spec.split)
    raise _not_found(path, spec.path)


def _looks_like_hub_id(text: str) -> bool:
    # "name" or "org/name", with no data-file suffix: anything else is clearly a local path.
    return (re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", text) is not None
            and not text.lower().endswith(DATA_SUFFIXES))


def _not_found(path: Path, label: str) -> DataError:
    hint = None
    if path.parent.is_dir():
        guess = closest(path.name, [p.name for p in path.parent.iterdir()])
        hint = f"did you mean '{path.parent / guess}'?" if guess else None
    return DataError("file not found", file=label, hint=hint)


def _read_file(path: Path, label: str) -> Rows:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(path, label)
    if suffix == ".json":
        return _read_json(path, label)
    if suffix in (".csv", ".tsv"):
        return _read_csv(path, label, delimiter="\t" if suffix == ".tsv" else ",")
    if suffix == ".parquet":
        return _read_parquet(path, label)
    raise DataError(f"unsupported file type '{suffix or path.name}'", file=label,
                    hint=f"use one of {', '.join(DATA_SUFFIXES)}, or a datasets directory")


def _open_binary(path: Path, label: str):
    try:
        return open(path, "rb")
    except OSError as err:
        raise DataError(f"cannot read the file: {err.strerror}", file=label) from None


def _text_lines(path: Path, label: str) -> Iterator[tuple[int, str | RowError]]:
    """(line number, text) for each line, read one at a time so a huge file never sits in memory
    (nor a huge line: one over ``MAX_LINE_BYTES`` comes out as a RowError).

    The UTF-8 byte order mark is dropped; the text keeps its line end ("\\n" or "\\r\\n"; none on an
    unterminated last line). A line that is not valid UTF-8 comes out as a RowError naming the byte.
    """
    offset = 0
    with _open_binary(path, label) as handle:
        for number, raw in enumerate(iter(lambda: handle.readline(MAX_LINE_BYTES + 1), b""), start=1):
            start, offset = offset, offset + len(raw)
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                length = len(raw) + _skip_rest_of_line(handle)
                offset = start + length
                yield number, Where(label, line=number).error(
                    "line too long", f"the line is {length / (1 << 20):.0f} MiB long; lines over "
                                     f"{MAX_LINE_BYTES >> 20} MiB are refused",
                    hint="split very long documents into several records")
                continue
            if number == 1 and raw.startswith(UTF8_BOM):
                raw, start = raw[len(UTF8_BOM):], start + len(UTF8_BOM)
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                byte = f"0x{raw[err.start]:02x} at byte offset {start + err.start} of the file"
                yield number, Where(label, line=number).error(
                    "invalid UTF-8", f"not valid UTF-8: {err.reason} (byte {byte})",
                    hint="save the file as UTF-8")


def _skip_rest_of_line(handle) -> int:
    """Read past the rest of an over-long line in 1 MiB pieces; returns how many bytes that was."""
    skipped = 0
    while piece := handle.readline(1 << 20):
        skipped += len(piece)
        if piece.endswith(b"\n"):
            break
    return skipped


def _read_jsonl(path: Path, label: str) -> Rows:
    for number, text in _text_lines(path, label):
        where = Where(label, line=number)
        if isinstance(text, RowError):
            yield where, text
            continue
        body = text.strip()
        if not body:
            continue  # blank lines separate nothing; skipping them keeps the other line numbers true
        try:
            yield where, json.loads(body)
        except json.JSONDecodeError as err:
            yield where, _json_line_error(where, err, body, last_line=not text.endswith("\n"))
        except RecursionError:
            yield where, where.error("invalid JSON", "invalid JSON: nested too deeply")


def _json_line_error(where: Where, err: json.JSONDecodeError, body: str, *, last_line: bool) -> RowError:
    hint = None
    if last_line:
        hint = "this is the last line and it has no line end: the file may be truncated"
    elif err.pos >= len(body):
        hint = ("JSON Lines needs each record whole on one line; a pretty-printed file should be a "
                ".json file holding a list of records")
    return where.error("invalid JSON", f"invalid JSON: {err.msg} (column {err.colno})", hint=hint)


_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _read_json(path: Path, label: str) -> Rows:
    """A JSON list of records. A file that starts with '{' is read as JSON Lines, as `datasets` does."""
    text = _read_whole_text(path, label)
    pos = _JSON_SPACE.match(text, 0).end()
    if pos == len(text):
        return
    if text[pos] == "{":
        yield from _read_jsonl(path, label)
        return
    if text[pos] != "[":
        raise DataError("expected a JSON list of records ('[{...}, {...}]') or one record per line",
                        file=label, line=text.count("\n", 0, pos) + 1)
    yield from _json_list_items(text, pos, label)


def _read_whole_text(path: Path, label: str) -> str:
    with _open_binary(path, label) as handle:
        data = handle.read()
    bom = len(UTF8_BOM) if data.startswith(UTF8_BOM) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as err:
        at = bom + err.start
        raise DataError(f"not valid UTF-8: {err.reason} (byte 0x{data[at]:02x} at byte offset {at})",
                        file=label, line=data.count(b"\n", 0, at) + 1,
                        hint="save the file as UTF-8") from None


def _json_list_items(text: str, pos: int, label: str) -> Rows:
    """Each element of the JSON list opening at ``pos``, with the line it starts on.

    A syntax error inside the list stops the read even with skip_invalid: after one, where the next
    record starts cannot be known.
    """
    decoder = json.JSONDecoder()
    line, counted = 1 + text.count("\n", 0, pos), pos
    pos = _JSON_SPACE.match(text, pos + 1).end()
    if text.startswith("]", pos):
        return
    index = 0
    while True:
        line, counted = line + text.count("\n", counted, pos), pos
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise _json_file_error(label, err, text, f"record {index}") from None
        except RecursionError:
            raise DataError(f"invalid JSON: record {index} is nested too deeply", file=label,
                            line=line) from None
        yield Where(label, line=line, row=index), value
        index += 1
        pos = _JSON_SPACE.match(text, end).end()
        if text.startswith("]", pos):
            return
        if not text.startswith(",", pos):
            err = json.JSONDecodeError("Expecting ',' or ']' after a record", text, pos)
            raise _json_file_error(label, err, text, f"after record {index - 1}")
        pos = _JSON_SPACE.match(text, pos + 1).end()


def _json_file_error(label: str, err: json.JSONDecodeError, text: str, what: str) -> DataError:
    truncated = not text.rstrip().endswith("]")
    hint = "the file ends in the middle of the list: it may be truncated" if truncated else None
    return DataError(f"invalid JSON in {what}: {err.msg} (column {err.colno})", file=label,
                     line=err.lineno, hint=hint)


def _read_csv(path: Path, label: str, *, delimiter: str) -> Rows:
    """Rows of a CSV/TSV file with a header; a row's line is its first line in the file (header = 1).

    Cells are text: CSV suits flat formats (Alpaca, prompt/completion strings, text, preference
    strings, KTO); message lists belong in JSONL, JSON or Parquet.
    """
    csv.field_size_limit(2**31 - 1)  # the default (128 KiB per cell) would refuse long documents
    reader = csv.reader(_csv_lines(path, label), delimiter=delimiter)
    header = None
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise DataError(f"invalid CSV: {err}", file=label, line=reader.line_num) from None
        if not cells or all(not cell.strip() for cell in cells):
            continue
        if header is None:
            header = _csv_header(cells, label, start)
            continue
        where = Where(label, line=start)
        if len(cells) != len(header):
            yield where, where.error("wrong cell count", f"has {len(cells)} cells but the header has "
                                                         f"{len(header)} columns")
            continue
        yield where, dict(zip(header, cells))


def _csv_lines(path: Path, label: str) -> Iterator[str]:
    for _number, text in _text_lines(path, label):
        if isinstance(text, RowError):
            raise text  # a bad byte may sit inside a quoted cell spanning lines: not one row's fault
        yield text


def _csv_header(cells: list[str], label: str, line: int) -> list[str]:
    names = [cell.strip() for cell in cells]
    for index, name in enumerate(names):
        if name and name in names[:index]:
            raise DataError(f"column '{name}' appears twice in the header", file=label, line=line)
    return names


def _read_parquet(path: Path, label: str) -> Rows:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        index = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield Where(label, row=index), row
                index += 1
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"cannot read as Parquet: {err}", file=label) from None


def _read_saved_dataset(path: Path, label: str, split: str) -> Rows:
    """A directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (Arrow files)."""
    if not ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        files = sorted(p.name for p in path.iterdir() if p.suffix.lower() in DATA_SUFFIXES)
        hint = f"point `path` at a file inside it, e.g. '{path / files[0]}'" if files else None
        raise DataError("is a directory, but not one written by datasets' save_to_disk (it has no "
                        "state.json or dataset_dict.json)", file=label, hint=hint)
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001 - any failure here is about the directory's contents
        raise DataError(f"cannot load the saved dataset: {_first_line(err)}", file=label) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"has no split '{split}'; it has {', '.join(loaded)}", file=label,
                            field="split", hint=did_you_mean(split, loaded))
        loaded = loaded[split]
    yield from _dataset_rows(loaded, label)


def _read_hub(dataset_id: str, split: str) -> Rows:
    import datasets

    try:
        dataset = datasets.load_dataset(dataset_id, split=split)
    except Exception as err:  # noqa: BLE001 - offline, unknown id, unknown split: all the user's to fix
        raise DataError(f"not found locally, and the Hugging Face Hub could not provide it either "
                        f"({type(err).__name__}: {_first_line(err)})", file=dataset_id,
                        hint="check the path; for a Hub dataset check the id, the split and the "
                             "network") from None
    yield from _dataset_rows(dataset, dataset_id)


def _dataset_rows(dataset: Any, label: str) -> Rows:
    for index, row in enumerate(dataset):
        yield Where(label, row=index), row


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ----------------------------------------------------------------------------------------------
# One row, with the file's column names and errors that name its place
# ----------------------------------------------------------------------------------------------

class _Row:
    """A raw row seen through ``DatasetSpec.columns``: ``get("messages")`` reads the mapped column,
    and errors name the file's own column name."""

    def __init__(self, data: Any, where: Where, columns: dict[str, str]):
        if not isinstance(data, dict):
            raise where.error("not an object", f"expected a record (an object with named fields), "
                                               f"got {_kind_of(data)}")
        self.data, self.where, self.columns = data, where, columns

    def column(self, name: str) -> str:
        return self.columns.get(name, name)

    def has(self, name: str) -> bool:
        return self.data.get(self.column(name)) is not None

    def fail(self, category: str, message: str, field: str | None = None,
             hint: str | None = None) -> NoReturn:
        raise self.where.error(category, message, field=field, hint=hint)

    def get(self, name: str, *, required: bool = True) -> Any:
        column = self.column(name)
        if column not in self.data:
            if not required:
                return None
            guess = closest(column, [str(key) for key in self.data])
            hint = (f"the record has '{guess}': rename it, or map it with `columns: {{{name}: {guess}}}`"
                    if guess else f"the record has {', '.join(map(str, self.data)) or 'no fields'}")
            self.fail("missing field", "required field is missing", column, hint)
        value = self.data[column]
        if value is None and required:
            self.fail("null value", "is null; expected a value", column)
        return value

    def text(self, name: str, *, required: bool = True) -> str | None:
        """A string field; an optional one that is empty or blank counts as absent."""
        value = self.get(name, required=required)
        if value is None:
            return None
        if not isinstance(value, str):
            self.fail("wrong type", f"expected a string, got {_kind_of(value)}", self.column(name))
        if not value.strip():
            if required:
                self.fail("empty content", "is empty", self.column(name))
            return None
        return value

    def number(self, name: str) -> float | None:
        """An optional number; CSV cells hold numbers as text, so numeric strings count too."""
        value = self.get(name, required=False)
        if isinstance(value, str):
            if not value.strip():
                return None
            try:
                value = float(value)
            except ValueError:
                self.fail("wrong type", f"expected a number, got {value!r}", self.column(name))
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail("wrong type", f"expected a finite number, got {value!r}", self.column(name))
        return float(value)

    def flag(self, name: str) -> bool:
        """A required boolean; 0/1 and true/false/yes/no text are accepted (CSV, integer columns)."""
        value = self.get(name)
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.strip().lower() in ("true", "1", "yes")
        self.fail("wrong type", f"expected true or false, got {value!r}", self.column(name))


# ----------------------------------------------------------------------------------------------
# Messages
# ----------------------------------------------------------------------------------------------

def _messages(row: _Row, value: Any, column: str, *, as_role: str | None = None) -> list[dict]:
    """A checked message list; a plain string becomes one ``as_role`` message when that is given."""
    if isinstance(value, str) and as_role is not None:
        return [{"role": as_role, "content": _content(row, value, column, as_role, has_calls=False)}]
    if not isinstance(value, list):
        wanted = "a list of messages" + (" or a string" if as_role else "")
        hint = "CSV cells hold only text: keep message lists in JSONL, JSON or Parquet" \
            if isinstance(value, str) else None
        row.fail("wrong type", f"expected {wanted}, got {_kind_of(value)}", column, hint)
    if not value:
        row.fail("empty conversation", "has no messages", column)
    return [_message(row, item, f"{column}[{index}]") for index, item in enumerate(value)]


def _message(row: _Row, item: Any, where: str) -> dict:
    if not isinstance(item, dict):
        row.fail("wrong type", "expected a message object with 'role' and 'content', "
                               f"got {_kind_of(item)}", where)
    role = _role(row, item.get("role"), f"{where}.role")
    calls = _tool_calls(row, item.get("tool_calls"), f"{where}.tool_calls")
    if "content" not in item and not calls:
        row.fail("missing field", "the message has no 'content'", f"{where}.content")
    message = {"role": role, "content": _content(row, item.get("content"), f"{where}.content", role,
                                                 has_calls=bool(calls))}
    for key in PASSTHROUGH_KEYS:
        if item.get(key) is not None:
            message[key] = item[key]
    return message


def _role(row: _Row, role: Any, where: str) -> str:
    if role is None:
        row.fail("missing field", "the message has no role", where)
    if not isinstance(role, str):
        row.fail("wrong type", f"expected a role name, got {_kind_of(role)}", where)
    if role not in ROLES:
        hint = did_you_mean(role, ROLES)
        if hint is None and role in SHAREGPT_ROLES:
            hint = (f"'{role}' is a ShareGPT speaker name: use '{SHAREGPT_ROLES[role]}', "
                    "or format: sharegpt")
        row.fail("unknown role", f"unknown role '{role}'; expected one of {', '.join(ROLES)}",
                 where, hint)
    return role


def _content(row: _Row, content: Any, where: str, role: str, *, has_calls: bool) -> str:
    """Message text. It may be empty (or null) only in an assistant message that calls tools."""
    allowed_empty = role == "assistant" and has_calls
    if content is None:
        if not allowed_empty:
            row.fail("null value", f"the {role} message's content is null", where)
        content = ""
    if not isinstance(content, str):
        row.fail("wrong type", f"expected text, got {_kind_of(content)}", where)
    if not content.strip() and not allowed_empty:
        row.fail("empty content", f"the {role} message is empty", where)
    return content


def _tool_calls(row: _Row, calls: Any, where: str) -> list | None:
    if calls is None:
        return None
    if not isinstance(calls, list) or not all(isinstance(call, dict) for call in calls):
        row.fail("wrong type", f"expected a list of tool-call objects, got {_kind_of(calls)}", where)
    return calls


def _tools(row: _Row) -> list | None:
    """The row's tool schemas: a list of objects, or that list as a JSON string (LLaMA-Factory)."""
    tools = row.get("tools", required=False)
    if isinstance(tools, str):
        if not tools.strip():
            return None
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as err:
            row.fail("invalid JSON", f"holds text that is not valid JSON: {err.msg}",
                     row.column("tools"))
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        row.fail("wrong type", f"expected a list of tool objects, got {_kind_of(tools)}",
                 row.column("tools"))
    return tools or None


def _with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def _check_ends_with_reply(row: _Row, messages: list[dict], column: str) -> None:
    """SFT learns the assistant's turns: there must be one, and nothing may follow the last."""
    roles = [message["role"] for message in messages]
    if "assistant" not in roles:
        row.fail("no assistant turn", "has no assistant turn: there is no reply to learn from", column)
    if roles[-1] != "assistant":
        row.fail("ends without assistant turn",
                 f"ends with a '{roles[-1]}' turn after the last assistant reply; it would teach "
                 "nothing",
                 f"{column}[{len(roles) - 1}]", "drop the trailing turns, or add the assistant's answer")


def _check_only_replies(row: _Row, messages: list[dict], column: str, offset: int = 0) -> None:
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            row.fail("non-assistant reply", f"holds a '{message['role']}' message where only the "
                                            "assistant's reply may be",
                     f"{column}[{index + offset}].role")


# ----------------------------------------------------------------------------------------------
# Formats -> records
# ----------------------------------------------------------------------------------------------

def _chat_record(row: _Row, spec: DatasetSpec, messages: list[dict], tools: list | None = None) -> dict:
    return {"messages": _with_system_prompt(messages, spec.system_prompt), "tools": tools,
            "source": row.where.source}


def _from_messages(row: _Row, spec: DatasetSpec) -> dict:
    column = row.column("messages")
    messages = _messages(row, row.get("messages"), column)
    _check_ends_with_reply(row, messages, column)
    return _chat_record(row, spec, messages, _tools(row))


def _from_sharegpt(row: _Row, spec: DatasetSpec) -> dict:
    column = row.column("conversations")
    turns = row.get("conversations")
    if not isinstance(turns, list):
        row.fail("wrong type", f"expected a list of turns, got {_kind_of(turns)}", column)
    if not turns:
        row.fail("empty conversation", "has no turns", column)
    messages = [_sharegpt_turn(row, turn, f"{column}[{index}]") for index, turn in enumerate(turns)]
    system = row.text("system", required=False)
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    _check_ends_with_reply(row, messages, column)
    return _chat_record(row, spec, messages, _tools(row))


def _sharegpt_turn(row: _Row, turn: Any, where: str) -> dict:
    if not isinstance(turn, dict):
        row.fail("wrong type", f"expected a turn object with 'from' and 'value', got {_kind_of(turn)}",
                 where)
    # Some ShareGPT exports use role/content inside `conversations`; the speaker names stay ShareGPT's.
    uses_role = "role" in turn and "from" not in turn
    speaker_key, value_key = ("role", "content") if uses_role else ("from", "value")
    speaker = turn.get(speaker_key)
    if not isinstance(speaker, str):
        row.fail("missing field" if speaker is None else "wrong type", "expected a speaker name",
                 f"{where}.{speaker_key}")
    if speaker not in SHAREGPT_ROLES:
        row.fail("unknown role",
                 f"unknown speaker '{speaker}'; expected one of {', '.join(SHAREGPT_ROLES)}",
                 f"{where}.{speaker_key}", did_you_mean(speaker, SHAREGPT_ROLES))
    value = turn.get(value_key)
    if speaker == "function_call":
        calls = _sharegpt_tool_calls(row, value, f"{where}.{value_key}")
        return {"role": "assistant", "content": "", "tool_calls": calls}
    role = SHAREGPT_ROLES[speaker]
    return {"role": role, "content": _content(row, value, f"{where}.{value_key}", role, has_calls=False)}


SHAPE = '{"name": ..., "arguments": {...}}'


def _sharegpt_tool_calls(row: _Row, value: Any, where: str) -> list[dict]:
    """A `function_call` turn's value, JSON {"name", "arguments"} (or a list of them), as tool calls."""
    try:
        calls = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError as err:
        row.fail("invalid JSON", f"a function_call value must be JSON {SHAPE}: {err.msg}", where)
    calls = calls if isinstance(calls, list) else [calls]
    if not calls or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
        row.fail("wrong type", f"a function_call value must be {SHAPE}", where)
    return [{"type": "function",
             "function": {"name": call["name"], "arguments": call.get("arguments", {})}}
            for call in calls]


def _from_alpaca(row: _Row, spec: DatasetSpec) -> dict:
    instruction = row.text("instruction")
    extra = row.text("input", required=False)
    output = row.text("output")
    system = row.text("system", required=False)
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return _chat_record(row, spec, messages)


def _from_prompt_completion(row: _Row, spec: DatasetSpec) -> dict:
    prompt = _messages(row, row.get("prompt"), row.column("prompt"), as_role="user")
    column = row.column("completion")
    completion = _messages(row, row.get("completion"), column, as_role="assistant")
    _check_ends_with_reply(row, completion, column)
    return _chat_record(row, spec, prompt + completion, _tools(row))


def _from_text(row: _Row, spec: DatasetSpec) -> dict:
    return {"text": row.text("text"), "source": row.where.source}


def _from_preference(row: _Row, spec: DatasetSpec) -> dict:
    chosen_raw, rejected_raw = row.get("chosen"), row.get("rejected")
    if row.has("prompt") and not _holds_whole_conversation(chosen_raw, rejected_raw):
        prompt, chosen, rejected = _explicit_pair(row, chosen_raw, rejected_raw)
    else:
        prompt, chosen, rejected = _implicit_pair(row, chosen_raw, rejected_raw)
    if chosen == rejected:
        row.fail("identical chosen and rejected", "is identical to chosen: the pair teaches nothing",
                 row.column("rejected"))
    return {"prompt": _with_system_prompt(prompt, spec.system_prompt), "chosen": chosen,
            "rejected": rejected, "margin": _margin(row), "source": row.where.source}


def _holds_whole_conversation(chosen: Any, rejected: Any) -> bool:
    # UltraFeedback-style rows give a `prompt` and also repeat it inside chosen/rejected; those are
    # split like implicit pairs (the `prompt` column is then redundant).
    return any(isinstance(side, list)
               and any(isinstance(m, dict) and m.get("role") != "assistant" for m in side)
               for side in (chosen, rejected))


def _explicit_pair(row: _Row, chosen_raw: Any, rejected_raw: Any) -> tuple[list, list, list]:
    prompt = _messages(row, row.get("prompt"), row.column("prompt"), as_role="user")
    sides = []
    for name, raw in (("chosen", chosen_raw), ("rejected", rejected_raw)):
        messages = _messages(row, raw, row.column(name), as_role="assistant")
        _check_only_replies(row, messages, row.column(name))
        sides.append(messages)
    return prompt, sides[0], sides[1]


def _implicit_pair(row: _Row, chosen_raw: Any, rejected_raw: Any) -> tuple[list, list, list]:
    """Split two whole conversations at their longest common prefix: that prefix is the prompt."""
    if isinstance(chosen_raw, str) or isinstance(rejected_raw, str):
        row.fail("missing field", "required field is missing", row.column("prompt"),
                 "chosen and rejected are plain strings, so the prompt must be given; only whole "
                 "conversations (message lists) may leave it out")
    chosen = _messages(row, chosen_raw, row.column("chosen"))
    rejected = _messages(row, rejected_raw, row.column("rejected"))
    if chosen == rejected:
        row.fail("identical chosen and rejected", "is identical to chosen: the pair teaches nothing",
                 row.column("rejected"))
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        row.fail("no shared prompt",
                 "chosen and rejected start differently, so no prompt can be split off",
                 row.column("chosen"), "give a `prompt` field, or start both with the same turns")
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if len(messages) == shared:
            row.fail("empty reply", "has no reply after the prompt it shares with the other side",
                     row.column(name))
        _check_only_replies(row, messages[shared:], row.column(name), offset=shared)
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _margin(row: _Row) -> float | None:
    """`margin`, or `score_chosen - score_rejected` when the row scores each side."""
    margin = row.number("margin")
    if margin is not None:
        return margin
    scores = {name: row.number(name) for name in ("score_chosen", "score_rejected")}
    given = [name for name, score in scores.items() if score is not None]
    if len(given) == 1:
        other = "score_rejected" if given[0] == "score_chosen" else "score_chosen"
        row.fail("missing field", f"is needed with '{row.column(given[0])}' to compute the margin",
                 row.column(other))
    return scores["score_chosen"] - scores["score_rejected"] if given else None


def _from_kto(row: _Row, spec: DatasetSpec) -> dict:
    prompt = _messages(row, row.get("prompt"), row.column("prompt"), as_role="user")
    column = row.column("completion")
    completion = _messages(row, row.get("completion"), column, as_role="assistant")
    _check_only_replies(row, completion, column)
    return {"prompt": _with_system_prompt(prompt, spec.system_prompt), "completion": completion,
            "label": row.flag("label"), "source": row.where.source}


CONVERTERS = {
    "messages": _from_messages, "sharegpt": _from_sharegpt, "alpaca": _from_alpaca,
    "prompt_completion": _from_prompt_completion, "text": _from_text, "preference": _from_preference,
    "kto": _from_kto,
}


# ----------------------------------------------------------------------------------------------
# Format: declared or detected
# ----------------------------------------------------------------------------------------------

def _formats_for(kind: str) -> tuple[str, ...]:
    if kind not in KIND_FORMATS:
        raise ConfigError(f"unknown data kind '{kind}'; expected one of {', '.join(KIND_FORMATS)}",
                          field="kind", hint=did_you_mean(kind, KIND_FORMATS))
    return KIND_FORMATS[kind]


def _settle_format(spec: DatasetSpec, kind: str, row: _Row) -> str:
    """The declared format, or the one the first record's keys show; either must suit ``kind``."""
    _check_mapped_columns(spec, row)
    allowed = _formats_for(kind)
    if spec.format != "auto":
        return spec.format
    detected = next((name for name, keys in SIGNATURES
                     if all(row.column(key) in row.data for key in keys)), None)
    if detected is None:
        raise _undetected(spec, row, allowed)
    if detected not in allowed:
        raise DataError(f"holds {detected} records, but {kind} training needs one of: "
                        f"{', '.join(allowed)}", file=row.where.file, line=row.where.line,
                        hint="check that this dataset belongs to this stage")
    return detected


def _undetected(spec: DatasetSpec, row: _Row, allowed: Sequence[str]) -> DataError:
    keys = [str(key) for key in row.data]
    signatures = [(name, names) for name, names in SIGNATURES if name in allowed]
    expected = "; ".join(f"{name} ({' + '.join(names)})" for name, names in signatures)
    wanted = sorted({name for _, names in signatures for name in names} - set(keys))
    hint = next((f"'{key}' looks like '{guess}': rename it, or map it with `columns: {{{guess}: {key}}}`"
                 for key in keys if (guess := closest(key, wanted))), None)
    return DataError(f"cannot tell the data format from the first record's keys "
                     f"({', '.join(keys) or 'none'}); expected {expected}",
                     file=row.where.file, line=row.where.line,
                     hint=hint or "map your column names with `columns`, or set `format`")


def _check_mapped_columns(spec: DatasetSpec, row: _Row) -> None:
    for ours, theirs in spec.columns.items():
        if theirs not in row.data:
            keys = [str(key) for key in row.data]
            raise ConfigError(f"maps '{ours}' to column '{theirs}', but the first record of "
                              f"{spec.path} has no such column (it has {', '.join(keys)})",
                              field=f"columns.{ours}", hint=did_you_mean(theirs, keys))


# ----------------------------------------------------------------------------------------------
# Loading one dataset
# ----------------------------------------------------------------------------------------------

@dataclass
class LoadResult:
    """The records of one dataset and what happened on the way."""

    path: str
    format: str
    records: list[dict]
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> rows skipped
    skipped_examples: dict[str, str] = dataclasses.field(default_factory=dict)  # reason -> first error
    duplicates: int = 0  # records identical to an earlier one (dropped only with drop_duplicates)
    errors: list[str] = dataclasses.field(default_factory=list)  # every skipped row's error, in order

    @property
    def form(self) -> str:
        return FORM_OF_FORMAT[self.format]

    def summary(self) -> str:
        text = f"{self.path}: {len(self.records)} records ({self.format})"
        if self.skipped:
            reasons = ", ".join(f"{count} {reason}" for reason, count in self.skipped.items())
            text += f"; skipped {sum(self.skipped.values())} ({reasons})"
        if self.duplicates:
            text += f"; {self.duplicates} duplicates"
        return text


class _Skips:
    """Counts skipped rows by reason and keeps every error; raises when not skipping."""

    def __init__(self, skip_invalid: bool):
        self.skip_invalid = skip_invalid
        self.counts: dict[str, int] = {}
        self.examples: dict[str, str] = {}
        self.errors: list[str] = []

    def add(self, error: RowError) -> None:
        if not self.skip_invalid:
            raise error
        self.counts[error.category] = self.counts.get(error.category, 0) + 1
        self.examples.setdefault(error.category, str(error))
        self.errors.append(str(error))


def load_records(spec: DatasetSpec, *, kind: str = "sft", skip_invalid: bool = False) -> LoadResult:
    """Read, detect, convert and check every row of ``spec``.

    ``kind`` ("sft", "text", "preference", "kto") says which formats the caller can train on.
    Raises DataError (file-wide fault, or a bad row unless ``skip_invalid``) or ConfigError.
    """
    allowed = _formats_for(kind)
    if spec.format != "auto" and spec.format not in allowed:
        raise ConfigError(f"format '{spec.format}' cannot be used for {kind} training; expected one of "
                          f"{', '.join(allowed)}", field="format")
    skips = _Skips(skip_invalid)
    records: list[dict] = []
    seen: set[bytes] = set()
    duplicates = rows = 0
    fmt = None
    for where, value in read_rows(spec):
        rows += 1
        try:
            if isinstance(value, RowError):
                raise value
            row = _Row(value, where, spec.columns)
            fmt = fmt or _settle_format(spec, kind, row)
            record = CONVERTERS[fmt](row, spec)
        except RowError as error:
            skips.add(error)
            continue
        key = _record_key(record)
        if key in seen:
            duplicates += 1
            if spec.drop_duplicates:
                continue
        seen.add(key)
        records.append(record)
    _check_not_empty(spec, rows, records, skips)
    return LoadResult(path=spec.path, format=fmt, records=records, skipped=skips.counts,
                      skipped_examples=skips.examples, duplicates=duplicates, errors=skips.errors)


def _check_not_empty(spec: DatasetSpec, rows: int, records: list[dict], skips: _Skips) -> None:
    if rows == 0:
        raise DataError("no records: the file or dataset is empty", file=spec.path)
    if not records:
        reasons = ", ".join(f"{count} {reason}" for reason, count in skips.counts.items())
        first = next(iter(skips.examples.values()), "")
        raise DataError(f"no usable records: all {rows} rows were invalid ({reasons})",
                        file=spec.path, hint=f"first error: {first}")


def _record_key(record: dict) -> bytes:
    """A digest of the record without its source, so the same content on two lines matches."""
    content = {key: value for key, value in record.items() if key != "source"}
    text = json.dumps(content, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha1(text.encode("utf-8")).digest()


# ----------------------------------------------------------------------------------------------
# Mixing and splitting
# ----------------------------------------------------------------------------------------------

def mix_counts(sizes: Sequence[tuple[DatasetSpec, int]]) -> list[int]:
    """How many records each dataset gives the mix.

    ``samples`` is an exact count. The other datasets share the sum of their sizes: whole, when none
    sets ``weight``; in proportion to the weights (largest-remainder rounding), when all do.
    """
    free = [index for index, (spec, _) in enumerate(sizes) if spec.samples is None]
    weighted = [index for index in free if sizes[index][0].weight is not None]
    if weighted and len(weighted) != len(free):
        unweighted = next(sizes[index][0].path for index in free if index not in weighted)
        raise ConfigError(f"'{unweighted}' has no weight while other datasets have one: weights are "
                          "shares of the mix, so set one on every dataset without `samples`, or on none",
                          field="weight")
    counts = [spec.samples if spec.samples is not None else size for spec, size in sizes]
    if weighted:
        total = sum(sizes[index][1] for index in free)
        shares = _apportion(total, [sizes[index][0].weight for index in free])
        for index, share in zip(free, shares):
            counts[index] = share
    return counts


def _apportion(total: int, weights: Sequence[float]) -> list[int]:
    """Split ``total`` in proportion to ``weights`` into whole numbers that add up to ``total``."""
    exact = [total * weight / sum(weights) for weight in weights]
    counts = [math.floor(value) for value in exact]
    by_remainder = sorted(range(len(exact)), key=lambda index: (counts[index] - exact[index], index))
    for index in by_remainder[: total - sum(counts)]:
        counts[index] += 1
    return counts


def _draw(records: list[dict], count: int, rng: random.Random) -> list[dict]:
    """``count`` records: a draw without replacement, or whole copies plus a drawn remainder."""
    if count and not records:
        raise DataError("no records to draw from")
    repeats, remainder = divmod(count, len(records)) if records else (0, 0)
    return records * repeats + rng.sample(records, remainder)


def mix(results: Sequence[tuple[DatasetSpec, list[dict]]], seed: int) -> list[dict]:
    """One shuffled list drawn from each dataset by ``mix_counts``; the same seed, the same mix.

    Repeated records are the same dict objects: treat records as read-only.
    """
    counts = mix_counts([(spec, len(records)) for spec, records in results])
    mixed: list[dict] = []
    for index, ((_spec, records), count) in enumerate(zip(results, counts)):
        mixed.extend(_draw(records, count, random.Random(f"{seed}:{index}")))
    random.Random(seed).shuffle(mixed)
    return mixed


def split(records: Sequence[dict], eval_ratio: float, seed: int, *,
          name: str | None = None) -> tuple[list[dict], list[dict]]:
    """A seeded, disjoint (train, eval) split; each part keeps the records' original order.

    ``name`` (the dataset's path) is only for the error when there are too few records.
    """
    if not 0 <= eval_ratio < 1:
        raise ConfigError(f"must be at least 0 and below 1, got {eval_ratio!r}", field="eval_ratio")
    if eval_ratio == 0:
        return list(records), []
    held_out = max(1, round(len(records) * eval_ratio))
    if held_out >= len(records):
        raise DataError(f"only {len(records)} records: too few to hold out eval_ratio={eval_ratio} and "
                        "still train", file=name, hint="lower eval_ratio, or give eval datasets")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    chosen = set(order[:held_out])
    train = [record for index, record in enumerate(records) if index not in chosen]
    evaluation = [records[index] for index in sorted(chosen)]
    return train, evaluation


@dataclass
class Mixture:
    """Train and eval records of a stage, with what went in (for logs and manifest.json)."""

    train: list[dict]
    eval: list[dict]
    form: str  # "chat", "text", "preference" or "kto": the record form of every record
    # One entry per dataset: path, role (train/eval), format, records, used, held_out, skipped,
    # duplicates.
    report: list[dict]
    data_hashes: dict[str, str]  # path -> sha256 of the file (or of a directory's files), or "hub:<id>"


def load_mixture(specs: Sequence[DatasetSpec], kind: str, seed: int, eval_ratio: float = 0.0,
                 eval_specs: Sequence[DatasetSpec] | None = None, skip_invalid: bool = False) -> Mixture:
    """Load every dataset, hold out eval records, and mix the rest.

    With ``eval_ratio``, each dataset holds out its own share before mixing, so an upsampled record
    never lands in both train and eval; ``weight``/``samples`` then apply to the train part. Given
    ``eval_specs``, those datasets (mixed by their own weights) are the eval set and ``eval_ratio`` is
    not used: stage configs keep a default ratio for when no eval datasets are listed.
    """
    if not specs:
        raise ConfigError("no datasets given: list at least one", field="datasets")
    if eval_specs:
        eval_ratio = 0.0
    loaded = [load_records(spec, kind=kind, skip_invalid=skip_invalid) for spec in specs]
    parts = [split(result.records, eval_ratio, seed + index, name=result.path)
             for index, result in enumerate(loaded)]
    train_parts = [(spec, train) for spec, (train, _) in zip(specs, parts)]
    report = _report("train", loaded, mix_counts([(spec, len(train)) for spec, train in train_parts]),
                     [len(held) for _, held in parts])
    train = mix(train_parts, seed)
    evaluation = [record for _, held in parts for record in held]
    eval_loaded: list[LoadResult] = []
    if eval_specs:
        eval_loaded = [load_records(spec, kind=kind, skip_invalid=skip_invalid) for spec in eval_specs]
        eval_sets = [(spec, result.records) for spec, result in zip(eval_specs, eval_loaded)]
        evaluation = mix(eval_sets, seed)
        report += _report("eval", eval_loaded, mix_counts([(s, len(r)) for s, r in eval_sets]),
                          [0] * len(eval_loaded))
    form = _common_form(loaded + eval_loaded)
    hashes = {spec.path: data_hash(spec.path) for spec in [*specs, *(eval_specs or [])]}
    return Mixture(train=train, eval=evaluation, form=form, report=report, data_hashes=hashes)


def _report(role: str, loaded: Sequence[LoadResult], used: Sequence[int],
            held_out: Sequence[int]) -> list[dict]:
    return [{"path": result.path, "role": role, "format": result.format, "records": len(result.records),
             "used": count, "held_out": held, "skipped": dict(result.skipped),
             "duplicates": result.duplicates}
            for result, count, held in zip(loaded, used, held_out)]


def _common_form(loaded: Sequence[LoadResult]) -> str:
    """Every dataset of one stage must give the same record form (an SFT run is chat or text)."""
    forms = {result.form: result.path for result in loaded}
    if len(forms) > 1:
        listed = ", ".join(f"{path} ({form})" for form, path in forms.items())
        raise ConfigError(f"cannot mix record forms in one run: {listed}", field="datasets",
                          hint="use only chat datasets or only plain-text datasets")
    return next(iter(forms))


# ----------------------------------------------------------------------------------------------
# Hashes for manifests
# ----------------------------------------------------------------------------------------------

def file_sha256(path: str | Path) -> str:
    """The sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tree_sha256(directory: str | Path) -> str:
    """One sha256 for a directory: every file's relative path and sha256, in sorted order."""
    directory = Path(directory)
    digest = hashlib.sha256()
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(directory).as_posix()}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def data_hash(path: str) -> str:
    """What identifies a dataset's contents in a manifest: a file or tree sha256, or the Hub id."""
    local = Path(path).expanduser()
    if local.is_file():
        return file_sha256(local)
    if local.is_dir():
        return tree_sha256(local)
    return f"hub:{path}"
