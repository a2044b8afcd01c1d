"""``lorelay data check PATH``: validate training data without training.

- Chat, preference and KTO data (JSONL, JSON, CSV/TSV, Parquet, saved datasets): every row is read
  and checked, and every bad row is listed with its file:line and field. Token statistics under the
  model's chat template come from exact assistant masks on a seeded sample of the rows (``--sample``;
  0 takes every row): rendering the template once per assistant turn costs a hundred times more than
  reading a row, and a sample of a few thousand rows gives the length distribution. A second process
  loads the tokenizer while the rows are read, and measures the sample (``pipelines.template_stats``).
- Plain-text corpora for CPT (``.txt``/``.md`` files and directories of them; data files with a text
  column with ``--kind cpt``): CPT's own reader and its checks, file by file: UTF-8, binary content
  (NUL bytes), empty documents, and the token count of every document.

``--kind`` selects the checks when the format does not say: a text file or a directory of them is a
CPT corpus; other files hold any record format unless ``--kind sft|preference|kto`` narrows it.
On a terminal a progress bar runs; otherwise nothing but the result is printed. Exit status 0 when
everything is usable, 1 when some rows or files are bad (all listed), 2 when the data as a whole
cannot be read.
"""

from __future__ import annotations

import random
from pathlib import Path

from pipelines.template_stats import LocalTemplate, TemplateWorker, length_stats
from stages.core.data import (TEXT_SUFFIXES, CorpusReport, CorpusSource, DatasetSpec, load_records, read_pieces,
                              source_files)
from stages.core.errors import DataError, LorelayError

KINDS = ("auto", "sft", "preference", "kto", "cpt", "text")  # text: the older name of cpt
DEFAULT_SAMPLE = 1000
TOKENIZE_BATCH = 512  # CPT documents tokenized per call (the fast tokenizer works through a batch in parallel)


def check_command(path: str, *, data_format: str = "auto", kind: str = "auto", model: str | None = None,
                  sample: int = DEFAULT_SAMPLE, separator: str | None = None, console=None,
                  worker: bool = True) -> int:
    """Check ``path`` and print the report. ``worker``: measure chat records under the template in a second
    process that loads the tokenizer while this one reads (False: load it here first)."""
    from rich.console import Console

    from stages.core.default_model import resolve_model_path
    from stages.core.modeling import ModelConfig
    from stages.core.tokenizer_loading import load_tokenizer

    console = console or Console()
    config = ModelConfig(name=model) if model else ModelConfig()
    model_path = resolve_model_path(config.name)
    corpus = corpus_kind(path, kind)
    # alone: without torch and the model stack where the tokenizer's files allow (a local model directory)
    template = TemplateWorker(model_path, config) if worker and not corpus else \
        LocalTemplate(load_tokenizer(model_path, config, alone=True)[0])
    try:
        with _progress(console) as progress:
            if corpus:
                rows, errors = check_corpus(path, template.tokenizer, separator=separator, progress=progress)
            else:
                rows, errors = check_records(path, template, data_format=data_format, kind=kind, sample=sample,
                                             progress=progress)
    finally:
        template.close()
    rows.append(("tokenizer", config.name))
    _print(console, f"lorelay data check: {path}", rows, errors)
    return 1 if errors else 0


def corpus_kind(path: str, kind: str) -> bool:
    """Whether ``path`` gets CPT's checks: asked for, or text files that no record format fits."""
    if kind in ("cpt", "text"):
        return True
    if kind != "auto":
        return False
    location = Path(path).expanduser()
    if location.is_file():
        return location.suffix.lower() in TEXT_SUFFIXES
    if location.is_dir() and not ((location / "state.json").is_file() or (location / "dataset_dict.json").is_file()):
        return any(p.suffix.lower() in TEXT_SUFFIXES for p in location.rglob("*") if p.is_file())
    return False


# ----------------------------------------------------------------------------------------------
# chat, preference and KTO records
# ----------------------------------------------------------------------------------------------

def check_records(path: str, template, *, data_format: str, kind: str, sample: int,
                  progress) -> tuple[list[tuple[str, str]], list[str]]:
    """Every row read and checked; the template's token statistics on a sample. ``template``: a
    ``pipelines.template_stats`` LocalTemplate or TemplateWorker."""
    reading = progress.add_task("reading rows", total=None)

    def on_rows(count: int) -> None:
        progress.update(reading, completed=count)
        template.check()  # a tokenizer that cannot load stops the check now, not after every row is read

    try:
        result = load_records(DatasetSpec(path=path, format=data_format), kind="any" if kind == "auto" else kind,
                              skip_invalid=True, on_rows=on_rows)
    except LorelayError:
        template.check(wait=True)  # the tokenizer's error first, as when it was loaded before the rows
        raise
    chosen = sample_records(result.records, sample)
    tokenizing = progress.add_task("rendering the chat template", total=len(chosen))
    lengths = template.lengths(chosen, on_records=lambda count: progress.advance(tokenizing, count))
    stats = lengths.summary()
    rows = [("format", result.format or "-"), ("rows read", str(len(result.records) + len(result.errors))),
            ("usable rows", str(len(result.records))), ("bad rows", str(len(result.errors))),
            ("duplicates", str(result.duplicates))]
    if stats:
        scope = "every row" if len(chosen) == len(result.records) else \
            f"a seeded sample of {len(chosen)} of {len(result.records)} rows"
        rows.append(("chat template checked on", scope))
        rows += [(f"{name} per sequence", _stats_line(stats[name])) for name in ("tokens", "loss_tokens")]
        rows.append(("loss-bearing fraction", f"{stats['loss_fraction']:.1%}"))
        if stats["rewritten"]:
            rows.append(("history rewritten by the template",
                         f"{stats['rewritten']} conversations: trained one sample per assistant turn"))
    return rows, result.errors + lengths.errors


def sample_records(records: list[dict], sample: int) -> list[dict]:
    """A seeded sample of ``sample`` records in file order (all of them when ``sample`` is 0 or more)."""
    if sample <= 0 or sample >= len(records):
        return records
    return [records[index] for index in sorted(random.Random(0).sample(range(len(records)), sample))]


# ----------------------------------------------------------------------------------------------
# plain-text corpora (CPT)
# ----------------------------------------------------------------------------------------------

def check_corpus(path: str, tokenizer, *, separator: str | None = None,
                 progress) -> tuple[list[tuple[str, str]], list[str]]:
    """CPT's reader over each file of ``path``: a bad file is listed and the others still checked."""
    files = source_files(CorpusSource(path=path, separator=separator))
    reading = progress.add_task("reading documents", total=len(files))
    errors: list[str] = []
    document_tokens: list[int] = []
    report = CorpusReport()
    for _kind, location in files:
        try:
            document_tokens += corpus_token_counts(CorpusSource(path=str(location), separator=separator),
                                                   tokenizer, report)
        except DataError as err:
            errors.append(str(err))
        progress.advance(reading)
    empty = sum(source.empty_documents for source in report.sources)
    if not document_tokens and not errors:
        raise DataError(f"no text: {len(files)} file(s) read, {empty} blank document(s), nothing to train on",
                        file=path)
    rows = [("kind", "cpt (plain-text corpus)"), ("files", str(len(files))), ("bad files", str(len(errors))),
            ("documents", str(len(document_tokens))), ("empty documents (skipped)", str(empty))]
    if document_tokens:
        rows += [("tokens", f"{sum(document_tokens)} (each document ends with EOS)"),
                 ("tokens per document", _stats_line(length_stats(document_tokens)))]
    return rows, errors


def corpus_token_counts(source: CorpusSource, tokenizer, report: CorpusReport) -> list[int]:
    """Tokens of each document of ``source`` (EOS included), read by CPT's own reader."""
    one = CorpusReport()
    counts: list[int] = []  # per document; starts at 1 for its EOS
    pending: list[str] = []
    owners: list[int] = []  # the document of each pending piece

    def flush():
        for owner, ids in zip(owners, tokenizer(pending, add_special_tokens=False)["input_ids"]):
            counts[owner] += len(ids)
        pending.clear()
        owners.clear()

    document = 0
    for text, ends in read_pieces([source], report=one, require_text=False):
        if document == len(counts):
            counts.append(1)
        pending.append(text)
        owners.append(document)
        document += ends
        if len(pending) >= TOKENIZE_BATCH:
            flush()
    if pending:
        flush()
    report.sources += one.sources
    return counts


def _stats_line(stats: dict) -> str:
    return f"min {stats['min']}  mean {stats['mean']}  p50 {stats['p50']}  p95 {stats['p95']}  max {stats['max']}"


def _progress(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=True, disable=not console.is_terminal)


def _print(console, title: str, rows: list[tuple[str, str]], errors: list[str]) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column("what")
    table.add_column("value")
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    for error in errors:
        console.print(f"[red]error[/red] {escape(error)}", highlight=False, soft_wrap=True)
    if errors:
        console.print(f"{len(errors)} bad rows or files: fix them, or set skip_invalid: true in the stage's data "
                      "section (rows only).")
    else:
        console.print("[green]ok[/green]: everything is usable")
