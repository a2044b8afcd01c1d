"""Readers: each yields (Where, value), where value is a parsed row or the RowError that parsing it
raised. File-wide faults are raised as DataError.

Data is parsed, never executed (JSON, CSV, Arrow; no pickle, no ``eval``). ``datasets``/``pyarrow``
are imported only inside the readers that need them, so ``lorelay data check`` starts fast.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stages.core.data.spec import DATA_SUFFIXES, MAX_LINE_BYTES, UTF8_BOM, DatasetSpec, RowError, Where
from stages.core.errors import DataError, closest, did_you_mean

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


def _read_jsonl(path: Path, label: str, *, pretty_hint: bool = True) -> Rows:
    """One record per line. ``pretty_hint``: say where a pretty-printed record belongs (not for a
    .json file, which is already that place)."""
    for number, text in _text_lines(path, label):
        where = Where(label, line=number)
        if isinstance(text, RowError):
            yield where, text
            continue
        body = text.strip()
        if not body:
            continue  # blank lines separate nothing; skipping them keeps the other line numbers true
        try:
            yield where, _parse_line(body)
        except json.JSONDecodeError as err:
            yield where, _json_line_error(where, err, body, last_line=not text.endswith("\n"),
                                          pretty_hint=pretty_hint)
        except RecursionError:
            yield where, where.error("invalid JSON", "invalid JSON: nested too deeply")


_RAW_DECODE = json.JSONDecoder().raw_decode


def _parse_line(body: str) -> Any:
    """``json.loads(body)`` for a stripped line, without its per-call checks where the line is one whole
    JSON value (almost every line; about a quarter of the parsing time). Anything else goes to ``json.loads``
    itself, so a bad line gets exactly its error."""
    try:
        value, end = _RAW_DECODE(body)
    except json.JSONDecodeError:
        return json.loads(body)
    return value if end == len(body) else json.loads(body)


def _json_line_error(where: Where, err: json.JSONDecodeError, body: str, *, last_line: bool,
                     pretty_hint: bool) -> RowError:
    hint = None
    if last_line:
        hint = "this is the last line and it has no line end: the file may be truncated"
    elif err.pos >= len(body):
        hint = "JSON Lines needs each record whole on one line"
        if pretty_hint:
            hint += "; pretty-printed records belong in a .json file (one record, or a list of them)"
    return where.error("invalid JSON", f"invalid JSON: {err.msg} (column {err.colno})", hint=hint)


_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _read_json(path: Path, label: str) -> Rows:
    """A JSON list of records, one record (an object, pretty-printed or not), or JSON Lines."""
    text = _read_whole_text(path, label)
    pos = _JSON_SPACE.match(text, 0).end()
    if pos == len(text):
        return
    if text[pos] == "{":
        yield from _json_object_or_lines(path, text, pos, label)
        return
    if text[pos] != "[":
        raise DataError("expected a JSON list of records ('[{...}, {...}]'), one record ('{...}') or "
                        "one record per line", file=label, line=text.count("\n", 0, pos) + 1)
    yield from _json_list_items(text, pos, label)


def _json_object_or_lines(path: Path, text: str, pos: int, label: str) -> Rows:
    """A file that starts with '{': one record when the whole file is one object, else JSON Lines."""
    line = 1 + text.count("\n", 0, pos)
    try:
        value, end = json.JSONDecoder().raw_decode(text, pos)
    except json.JSONDecodeError as err:
        first_line = text[pos:text.find("\n", pos) if "\n" in text[pos:] else len(text)]
        if _is_json(first_line):  # the first line is a whole record: JSON Lines with a bad line later
            yield from _read_jsonl(path, label, pretty_hint=False)
            return
        raise _json_file_error(label, err, text, "the record", closer="}") from None
    except RecursionError:
        raise DataError("invalid JSON: the record is nested too deeply", file=label, line=line) from None
    if _JSON_SPACE.match(text, end).end() == len(text):
        yield Where(label, line=line), value
        return
    yield from _read_jsonl(path, label, pretty_hint=False)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return False
    return True


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


def _json_file_error(label: str, err: json.JSONDecodeError, text: str, what: str, *,
                     closer: str = "]") -> DataError:
    truncated = not text.rstrip().endswith(closer)
    container = "the list" if closer == "]" else "the record"
    hint = f"the file ends in the middle of {container}: it may be truncated" if truncated else None
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

