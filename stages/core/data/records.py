"""Loading one dataset: read, detect, convert and check every row, counting what was skipped."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from stages.core.data.fields import Row
from stages.core.data.formats import CONVERTERS, formats_for, settle_format
from stages.core.data.readers import read_rows
from stages.core.data.spec import FORM_OF_FORMAT, DatasetSpec, RowError
from stages.core.errors import ConfigError, DataError

# ----------------------------------------------------------------------------------------------
# Loading one dataset
# ----------------------------------------------------------------------------------------------

PROGRESS_ROWS = 1000  # rows between progress reports: reporting every row added about a tenth to the reading time

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


def load_records(spec: DatasetSpec, *, kind: str = "sft", skip_invalid: bool = False,
                 on_rows: Callable[[int], None] | None = None, limit: int | None = None) -> LoadResult:
    """Read, detect, convert and check every row of ``spec`` (or only its first ``limit`` rows).

    ``kind`` ("sft", "text", "preference", "kto", or "any" for a check without training) says which
    formats the caller can train on. ``on_rows`` (a progress display) is told how many rows have been read
    every ``PROGRESS_ROWS`` rows and at the end.
    Raises DataError (file-wide fault, or a bad row unless ``skip_invalid``) or ConfigError.
    """
    allowed = formats_for(kind)
    if spec.format != "auto" and spec.format not in allowed:
        raise ConfigError(f"format '{spec.format}' cannot be used for {kind} training; expected one of "
                          f"{', '.join(allowed)}", field="format")
    skips = _Skips(skip_invalid)
    records: list[dict] = []
    seen: set[tuple[str, ...] | bytes] = set()
    duplicates = rows = 0
    fmt = None
    with _collector_paused():
        for where, value in read_rows(spec):
            if limit is not None and rows >= limit:
                break
            rows += 1
            if on_rows is not None and not rows % PROGRESS_ROWS:
                on_rows(rows)
            try:
                if isinstance(value, RowError):
                    raise value
                row = Row(value, where, spec.columns)
                fmt = fmt or settle_format(spec, kind, row)
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
    if on_rows is not None:
        on_rows(rows)
    _check_not_empty(spec, rows, records, skips)
    return LoadResult(path=spec.path, format=fmt, records=records, skipped=skips.counts,
                      skipped_examples=skips.examples, duplicates=duplicates, errors=skips.errors)


@contextlib.contextmanager
def _collector_paused():
    """Python's cyclic garbage collector off while rows are read.

    Reading makes hundreds of thousands of small dicts and lists, none of them in a reference cycle,
    and every collector pass walks all that are still alive: a fifth of the time of reading 100k chat
    rows. Whatever cycles arise meanwhile (a skipped row's error) are collected once it is back on.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _check_not_empty(spec: DatasetSpec, rows: int, records: list[dict], skips: _Skips) -> None:
    if rows == 0:
        raise DataError("no records: the file or dataset is empty", file=spec.path)
    if not records:
        reasons = ", ".join(f"{count} {reason}" for reason, count in skips.counts.items())
        first = next(iter(skips.examples.values()), "")
        raise DataError(f"no usable records: all {rows} rows were invalid ({reasons})",
                        file=spec.path, hint=f"first error: {first}")


_PLAIN_CHAT_KEYS = frozenset({"messages", "tools", "source"})


def _record_key(record: dict) -> tuple[str, ...] | bytes:
    """The record's content without its source, so the same content on two lines matches.

    A conversation of plain role/content messages (no tools, no tool calls: most chat data) is keyed by
    its strings themselves, in order: exact, and under half the cost of a digest. Any other record by a
    digest of its ``repr``, which is half the cost of ``json.dumps(sort_keys=True)`` and as exact: the
    converters build every record's keys in one order (a tool schema's own key order counts, as it does
    in the rendered text). The two kinds of key never equal each other.
    """
    if record.keys() == _PLAIN_CHAT_KEYS and record["tools"] is None:
        strings: list[str] = []
        for message in record["messages"]:
            if len(message) != 2:  # role and content are always there; a third key is a tool call or name
                break
            strings += (message["role"], message["content"])
        else:
            return tuple(strings)
    content = dict(record)
    content.pop("source", None)
    return hashlib.sha1(repr(content).encode("utf-8", "surrogatepass")).digest()
