"""Raw text corpora in, packed token blocks out (continued pretraining).

A ``CorpusSource`` names a ``.txt``/``.md`` file or a directory of them (one document per file, or
split on ``separator``), a JSONL/JSON/CSV/Parquet file or a ``datasets`` directory with a text
column (read by ``stages.core.data.readers``), or a Hub dataset id (tried only when no such local
path exists). ``PackedCorpus`` turns sources into blocks, one pipeline of generators:

    read_pieces -> tokenize (EOS after each document) -> pack into block_size -> [hold out] ->
    [shuffle buffer] -> [token budget]

Each block is ``{"input_ids": [...], "seq_lengths": [...]}``: the lengths of the document pieces it
holds, in order. A document longer than the room left in a block continues in the next block as a
new piece. ``BlockCollator`` turns blocks into a batch whose ``position_ids`` restart at 0 at every
piece and whose labels are -100 on each piece's first token, so

- the first token of a document is never predicted from the previous document (loss on every other
  token, the EOS included);
- packed documents do not attend to each other: with ``attention_mask=None`` and no KV cache,
  transformers' sdpa and eager attention read the restarts in ``position_ids`` as packed sequences
  and build a block-diagonal causal mask, row by row. flash-attention-2 only does this for one
  flattened row (batch size 1) or given ``cu_seq_lens``: TRL's ``DataCollatorForLanguageModeling``
  with ``padding_free=True`` makes those from ``seq_lengths``, so the CPT stage uses it there.

Memory does not grow with the corpus: files are read in 256 KiB chunks, a long document is cut into
pieces of about 64K characters at a point where the tokenizer would split anyway (before a line that
starts with a non-space character, else before a space between words), and only the shuffle buffer
holds blocks. Structured files go through ``stages.core.data.readers.read_rows``, which reads JSONL line by line,
Parquet in batches and ``datasets`` directories memory-mapped (a ``.json`` list is read whole: use
JSONL for big corpora).

Faults name the file: binary files (a NUL byte), bytes that are not UTF-8 (line and byte offset),
missing or unreadable paths, sources with no text at all. torch is not imported here.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from stages.core.config import field
from stages.core.data.mixture import data_hash
from stages.core.data.readers import read_rows
from stages.core.data.spec import DATA_SUFFIXES, UTF8_BOM, DatasetSpec, RowError
from stages.core.errors import ConfigError, DataError, closest, did_you_mean

TEXT_SUFFIXES = (".txt", ".text", ".md")
READ_BYTES = 1 << 18    # bytes read from a text file at a time
PIECE_CHARS = 1 << 16   # a document is tokenized in pieces of about this many characters
HASH_LIMIT = 256 << 20  # sources up to this size get a full sha256 in the manifest; larger ones a quick one

Block = dict[str, list[int]]  # {"input_ids": [...], "seq_lengths": [...]}


@dataclass
class CorpusSource:
    """One corpus: a text file, a directory of them, a data file with a text column, or a Hub id."""

    path: str = field(help="A .txt/.md file, a directory (its .txt/.md and data files, recursively), a "
                           ".jsonl/.json/.csv/.parquet file, a datasets save_to_disk directory, or a Hub id.")
    separator: str | None = field(None, help="Split text files into documents at this string, e.g. "
                                             "\"\\n\\n\\n\" or \"<|doc|>\"; none: one document per file.")
    text_column: str = field("text", help="The column holding the text, for data files and datasets.")
    split: str = field("train", help="Split to read from a Hub dataset or a saved DatasetDict.")

    def __post_init__(self):
        self.path = str(self.path)
        if not self.path.strip():
            raise ConfigError("must name a file, a directory or a Hub dataset id", field="path")
        if self.separator is not None and self.separator == "":
            raise ConfigError("must not be empty; leave it out for one document per file", field="separator")
        if not self.text_column:
            raise ConfigError("must name a column", field="text_column")


# ----------------------------------------------------------------------------------------------
# What was read (for metrics.json and logs)
# ----------------------------------------------------------------------------------------------

@dataclass
class SourceReport:
    path: str
    files: int = 0
    documents: int = 0
    empty_documents: int = 0  # blank documents (or rows with blank text): skipped

    def summary(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class CorpusReport:
    """Counts of one pass over a corpus: ``PackedCorpus.report`` is the latest pass, so far."""

    sources: list[SourceReport] = dataclasses.field(default_factory=list)
    tokens: int = 0          # tokens in the blocks given out, EOS included
    blocks: int = 0
    held_out_blocks: int = 0
    budget_reached: bool = False

    @property
    def documents(self) -> int:
        return sum(source.documents for source in self.sources)

    def summary(self) -> dict:
        return {"documents": self.documents, "tokens": self.tokens, "blocks": self.blocks,
                "held_out_blocks": self.held_out_blocks, "budget_reached": self.budget_reached,
                "sources": [source.summary() for source in self.sources]}


# ----------------------------------------------------------------------------------------------
# Finding the files of a source
# ----------------------------------------------------------------------------------------------

def source_files(source: CorpusSource) -> list[tuple[str, Path | str]]:
    """(kind, location) for each input of ``source``: kind is "text" (a text file) or "rows"."""
    path = Path(source.path).expanduser()
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return [("rows", path)]
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts)
                       and p.suffix.lower() in TEXT_SUFFIXES + DATA_SUFFIXES)
        if not files:
            raise DataError(f"no text files ({', '.join(TEXT_SUFFIXES)}) or data files "
                            f"({', '.join(DATA_SUFFIXES)}) in this directory", file=source.path)
        return [(_file_kind(p), p) for p in files]
    if path.is_file():
        return [(_file_kind(path), path)]
    if path.exists():
        raise DataError("is not a regular file or directory", file=source.path)
    if not path.suffix and not source.path.startswith((".", "/", "~")) and source.path.count("/") <= 1:
        return [("rows", source.path)]  # a Hub id; read_rows says so clearly when it cannot be had
    hint = None
    if path.parent.is_dir():
        guess = closest(path.name, [p.name for p in path.parent.iterdir()])
        hint = f"did you mean '{path.parent / guess}'?" if guess else None
    raise DataError("file not found", file=source.path, hint=hint)


def _file_kind(path: Path) -> str:
    # A file named explicitly is text unless it has a data suffix (a .log or README is text too).
    return "rows" if path.suffix.lower() in DATA_SUFFIXES else "text"


def corpus_hash(source: CorpusSource) -> str:
    """What identifies a source in manifest.json: the sha256 of ``stages.core.data``, or for sources over
    256 MiB a quick hash of names, sizes, modification times and each file's first and last MiB."""
    path = Path(source.path).expanduser()
    if not path.exists():
        return f"hub:{source.path}"
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    if sum(f.stat().st_size for f in files) <= HASH_LIMIT:
        return data_hash(str(path))
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(path) if path.is_dir() else file.name}:{stat.st_size}:"
                      f"{stat.st_mtime_ns}\n".encode())
        with open(file, "rb") as handle:
            digest.update(handle.read(1 << 20))
            handle.seek(max(0, stat.st_size - (1 << 20)))
            digest.update(handle.read())
    return "quick:" + digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Reading: (text, ends_document) pieces; a document's pieces concatenate to its text
# ----------------------------------------------------------------------------------------------

Piece = tuple[str, bool]


def read_pieces(sources: Sequence[CorpusSource], *, report: CorpusReport | None = None,
                seed: int | None = None, require_text: bool = True) -> Iterator[Piece]:
    """Every document of ``sources`` as pieces. ``seed`` shuffles the order of the files.

    Leading and trailing whitespace of each document is dropped, and blank documents are skipped
    (counted). A source with no text at all is a DataError, unless ``require_text`` is false (a check
    that reads a corpus file by file counts a blank file as an empty document).
    """
    report = report if report is not None else CorpusReport()
    report.sources = [SourceReport(path=source.path) for source in sources]
    inputs = [(source, counts, kind, location) for source, counts in zip(sources, report.sources)
              for kind, location in source_files(source)]
    if seed is not None:
        random.Random(seed).shuffle(inputs)
    for source, counts, kind, location in inputs:
        counts.files += 1
        if kind == "text":
            pieces = _split_documents(_decoded_chunks(Path(location), str(location)), source.separator)
        else:
            pieces = _row_documents(source, location)
        yield from _clean(pieces, counts)
    for source, counts in zip(sources, report.sources):
        if require_text and counts.documents == 0:
            raise DataError(f"no text: {counts.files} file(s) read, {counts.empty_documents} blank "
                            "document(s), nothing to train on", file=source.path)


def _decoded_chunks(path: Path, label: str) -> Iterator[str]:
    """The text of a UTF-8 file, READ_BYTES at a time; a NUL byte or invalid UTF-8 is a DataError."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes of the file consumed before this chunk
    lines = 1   # the line at ``offset``
    try:
        handle = open(path, "rb")
    except OSError as err:
        raise DataError(f"cannot read the file: {err.strerror}", file=label) from None
    with handle:
        while True:
            try:
                raw = handle.read(READ_BYTES)
            except OSError as err:
                raise DataError(f"cannot read the file: {err.strerror}", file=label) from None
            if offset == 0 and raw.startswith(UTF8_BOM):
                raw, offset = raw[len(UTF8_BOM):], len(UTF8_BOM)
            nul = raw.find(b"\0")
            if nul >= 0:
                raise DataError(f"looks like a binary file, not text (NUL byte at byte offset {offset + nul})",
                                file=label, line=lines + raw.count(b"\n", 0, nul),
                                hint="give UTF-8 text files (a UTF-16 file has NUL bytes too: save it as UTF-8)")
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as err:
                pending = len(err.object) - len(raw)  # bytes the decoder held back from the last chunk
                at = offset - pending + err.start
                line = lines + raw.count(b"\n", 0, max(0, err.start - pending))
                raise DataError(f"not valid UTF-8: {err.reason} (byte 0x{err.object[err.start]:02x} at byte "
                                f"offset {at})", file=label, line=line, hint="save the file as UTF-8") from None
            if not raw:
                return
            offset += len(raw)
            lines += raw.count(b"\n")
            if text:
                yield text


def _split_documents(chunks: Iterable[str], separator: str | None) -> Iterator[Piece]:
    """Pieces of the documents in a stream of text chunks: the whole stream, or split at ``separator``."""
    keep = len(separator) - 1 if separator else 0  # a separator may straddle two chunks
    buffer = ""
    for chunk in chunks:
        buffer += chunk
        if separator:
            start = 0
            while (found := buffer.find(separator, start)) >= 0:
                yield buffer[start:found], True
                start = found + len(separator)
            buffer = buffer[start:]
        if len(buffer) > 2 * PIECE_CHARS:
            cut = cut_point(buffer, len(buffer) - keep)
            yield buffer[:cut], False
            buffer = buffer[cut:]
    yield buffer, True


def cut_point(text: str, limit: int) -> int:
    """Where to cut ``text`` (at most at ``limit``) so both halves tokenize as the whole does.

    Byte-level BPE pre-tokenizers split before a line that starts with a non-space character, and
    before a space that starts a word, so a cut there changes no token. Otherwise cut at ``limit``.
    """
    index = text.rfind("\n", 0, limit)
    while index > 0:
        if index + 1 < len(text) and not text[index + 1].isspace():
            return index + 1
        index = text.rfind("\n", 0, index)
    index = text.rfind(" ", 0, limit)
    while index > 0:
        if index + 1 < len(text) and not text[index + 1].isspace() and not text[index - 1].isspace():
            return index
        index = text.rfind(" ", 0, index)
    return max(limit, 1)


def _row_documents(source: CorpusSource, location: Path | str) -> Iterator[Piece]:
    """One document per row of a data file, a datasets directory or a Hub dataset."""
    spec = DatasetSpec(path=str(location), format="text", split=source.split)
    column = source.text_column
    for where, value in read_rows(spec):
        if isinstance(value, RowError):
            raise value
        if not isinstance(value, dict):
            raise where.error("not an object", "expected a record with a text column")
        if column not in value:
            keys = [str(key) for key in value]
            raise DataError(f"has no '{column}' column (it has {', '.join(keys) or 'none'})", file=where.file,
                            line=where.line, field=column,
                            hint=did_you_mean(column, keys) or "set text_column on this source")
        text = value[column]
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise where.error("wrong type", f"expected text, got {type(text).__name__}", field=column)
        yield text, True


def _clean(pieces: Iterable[Piece], counts: SourceReport) -> Iterator[Piece]:
    """Strip each document's outer whitespace, drop blank documents, count the rest."""
    started, carry = False, ""
    for text, ends in pieces:
        if started:
            text = carry + text
        else:
            text = text.lstrip()
            started = bool(text)
        if started:
            body = text.rstrip()
            carry = text[len(body):]
            if len(carry) > PIECE_CHARS:  # a run of whitespace inside a document: keep it, in pieces
                body, carry = text, ""
            if body or ends:
                yield body, ends
        if ends:
            if started:
                counts.documents += 1
            else:
                counts.empty_documents += 1
            started, carry = False, ""

