"""``lorelay data check FILE``: validate a data file without training.

Prints the detected format, the sample count, token-length statistics under the model's chat
template, and every bad row with its file:line. Exit status 0 only when every row is usable, 1 when
some rows are bad (they are all listed), 2 when the file as a whole cannot be read.
"""

from __future__ import annotations

import statistics

from stages.core.data import DatasetSpec, LoadResult, load_records
from stages.core.errors import LorelayError


def record_token_lengths(tokenizer, record: dict) -> list[tuple[int, int]]:
    """(tokens, loss-bearing tokens) of each sequence a record trains on (two for a pair)."""
    from stages.core.data import encode_record

    if "messages" in record or "text" in record:
        ids, mask = encode_record(tokenizer, record)
        return [(len(ids), sum(mask))]
    replies = [record["chosen"], record["rejected"]] if "chosen" in record else [record["completion"]]
    lengths = []
    for reply in replies:
        ids, mask = encode_record(tokenizer, {"messages": record["prompt"] + reply, "source": record["source"]})
        lengths.append((len(ids), sum(mask)))
    return lengths


def length_stats(lengths: list[int]) -> dict[str, float]:
    ordered = sorted(lengths)
    return {"min": ordered[0], "mean": round(statistics.fmean(ordered), 1), "p50": ordered[len(ordered) // 2],
            "p95": ordered[int(0.95 * (len(ordered) - 1))], "max": ordered[-1]}


def token_statistics(tokenizer, result: LoadResult) -> tuple[dict, list[str]]:
    """Length statistics over all records, and the rows the chat template could not render."""
    totals, loss, errors = [], [], []
    for record in result.records:
        try:
            for tokens, loss_tokens in record_token_lengths(tokenizer, record):
                totals.append(tokens)
                loss.append(loss_tokens)
        except LorelayError as err:
            errors.append(str(err))
    if not totals:
        return {}, errors
    stats = {"tokens": length_stats(totals), "loss_tokens": length_stats(loss),
             "loss_fraction": round(sum(loss) / max(sum(totals), 1), 3)}
    return stats, errors


def check_command(file: str, *, data_format: str = "auto", kind: str = "sft", model: str | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    from stages.core.modeling import ModelConfig, load_tokenizer
    from stages.core.default_model import resolve_model_path

    console = Console()
    result = load_records(DatasetSpec(path=file, format=data_format), kind=kind, skip_invalid=True)
    config = ModelConfig(name=model) if model else ModelConfig()
    tokenizer, _ = load_tokenizer(resolve_model_path(config.name), config)
    stats, template_errors = token_statistics(tokenizer, result)
    errors = result.errors + template_errors

    table = Table(title=f"lorelay data check: {file}", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("format", result.format or "-")
    table.add_row("usable samples", str(len(result.records) - len(template_errors)))
    table.add_row("bad rows", str(len(errors)))
    table.add_row("duplicates", str(result.duplicates))
    if stats:
        for name in ("tokens", "loss_tokens"):
            s = stats[name]
            table.add_row(f"{name} per sequence", f"min {s['min']}  mean {s['mean']}  p50 {s['p50']}  "
                                                  f"p95 {s['p95']}  max {s['max']}")
        table.add_row("loss-bearing fraction", f"{stats['loss_fraction']:.1%}")
    table.add_row("tokenizer", config.name)
    console.print(table)
    for error in errors:
        console.print(f"[red]error[/red] {error}", highlight=False, soft_wrap=True)
    if errors:
        console.print(f"{len(errors)} bad rows: fix them, or set skip_invalid: true in the stage's data section.")
        return 1
    console.print("[green]ok[/green]: every row is usable")
    return 0
