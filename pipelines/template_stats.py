"""Token statistics of chat, preference and KTO records under the model's chat template (``lorelay data check``).

Each sampled record is rendered and masked exactly as training does it (``stages.core.data.encode_samples``).
That needs the tokenizer, and loading it means importing transformers: about a second on a CPU, half the
time it takes to read 100k rows. So ``TemplateWorker`` measures in a second process, started before the
rows are read: it loads the tokenizer while this process reads, then measures the sample it is sent.
``LocalTemplate`` measures in this process, with a tokenizer the caller has loaded. Both give the same
numbers: the worker's per-record lengths are summed here exactly as the local ones are.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import statistics
import traceback
from collections.abc import Callable

from stages.core.errors import LorelayError

CHUNK = 100  # records per message to the worker: the progress bar moves once per chunk
# Measured once by the worker before it says it is ready: the first record costs a hundred times the next
# (the template is compiled), and it is better paid while this process still reads. A template that
# refuses it only records an error here, which is dropped; the sample's rows get their own.
WARM_UP = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
           "tools": None, "source": "warm-up"}


@dataclasses.dataclass
class Lengths:
    """(tokens, loss-bearing tokens) of every sequence measured, conversations whose history the template
    rewrote, and the rows it could not render."""

    tokens: list[int] = dataclasses.field(default_factory=list)
    loss: list[int] = dataclasses.field(default_factory=list)
    rewritten: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)

    def add(self, other: Lengths) -> None:
        self.tokens += other.tokens
        self.loss += other.loss
        self.rewritten += other.rewritten
        self.errors += other.errors

    def summary(self) -> dict:
        """Length statistics of tokens and loss tokens per sequence; empty when nothing was measured."""
        if not self.tokens:
            return {}
        return {"tokens": length_stats(self.tokens), "loss_tokens": length_stats(self.loss),
                "loss_fraction": round(sum(self.loss) / max(sum(self.tokens), 1), 3), "rewritten": self.rewritten}


def record_token_lengths(tokenizer, record: dict) -> tuple[list[tuple[int, int]], bool]:
    """(tokens, loss-bearing tokens) of each sequence a record trains on, and whether the template
    rewrote the conversation's history (then one sequence per assistant turn)."""
    from stages.core.data import encode_samples

    if "messages" in record or "text" in record:
        samples, rewritten = encode_samples(tokenizer, record)
        return [(len(ids), sum(mask)) for ids, mask in samples], rewritten
    replies = [record["chosen"], record["rejected"]] if "chosen" in record else [record["completion"]]
    lengths, rewritten = [], False
    for reply in replies:
        samples, rewritten = encode_samples(tokenizer, {"messages": record["prompt"] + reply, "source": record["source"]})
        lengths += [(len(ids), sum(mask)) for ids, mask in samples]
    return lengths, rewritten


def measure(tokenizer, records: list[dict]) -> Lengths:
    lengths = Lengths()
    for record in records:
        try:
            sequences, rewritten = record_token_lengths(tokenizer, record)
        except LorelayError as err:
            lengths.errors.append(str(err))
            continue
        lengths.tokens += [tokens for tokens, _ in sequences]
        lengths.loss += [loss_tokens for _, loss_tokens in sequences]
        lengths.rewritten += rewritten
    return lengths


def length_stats(lengths: list[int]) -> dict[str, float]:
    ordered = sorted(lengths)
    rank = lambda share: ordered[math.ceil(share * (len(ordered) - 1))]  # noqa: E731 - nearest rank, upper
    return {"min": ordered[0], "mean": round(statistics.fmean(ordered), 1), "p50": rank(0.5), "p95": rank(0.95),
            "max": ordered[-1]}


def _chunks(records: list[dict]) -> list[list[dict]]:
    return [records[start:start + CHUNK] for start in range(0, len(records), CHUNK)]


class LocalTemplate:
    """Measures in this process with ``tokenizer``."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def check(self, *, wait: bool = False) -> None:
        """Nothing to check: the tokenizer is loaded."""

    def lengths(self, records: list[dict], *, on_records: Callable[[int], None] | None = None) -> Lengths:
        total = Lengths()
        for chunk in _chunks(records):
            total.add(measure(self.tokenizer, chunk))
            if on_records is not None:
                on_records(len(chunk))
        return total

    def close(self) -> None:
        pass


class TemplateWorker:
    """Measures in a second process, which starts loading the tokenizer of ``config`` (a ``ModelConfig``)
    from ``model_path`` at once. ``check`` raises its loading error (a ``LorelayError``, as in this
    process) once it is known; ``lengths`` waits for the tokenizer, then measures."""

    def __init__(self, model_path: str, config):
        # spawn, not fork: a fresh interpreter is safe whatever threads this one runs (rich's progress bar).
        context = multiprocessing.get_context("spawn")
        self._connection, child_end = context.Pipe()
        self._process = context.Process(target=_serve, args=(child_end, model_path, config), daemon=True,
                                        name="lorelay-data-check-template")
        self._process.start()
        child_end.close()
        self._ready = False
        self._failure: LorelayError | None = None

    def check(self, *, wait: bool = False) -> None:
        """Raise the worker's tokenizer error if it has one; ``wait``: until it is known."""
        if not self._ready and self._failure is None and (wait or self._connection.poll()):
            try:
                self._receive("ready")
                self._ready = True
            except LorelayError as err:
                self._failure = err
        if self._failure is not None:
            raise self._failure

    def lengths(self, records: list[dict], *, on_records: Callable[[int], None] | None = None) -> Lengths:
        self.check(wait=True)
        total = Lengths()
        for chunk in _chunks(records):
            self._connection.send(chunk)
            total.add(self._receive("lengths"))
            if on_records is not None:
                on_records(len(chunk))
        return total

    def close(self) -> None:
        """Stop the worker: it holds nothing but the tokenizer, so it is not left to tear down transformers."""
        self._process.terminate()
        self._process.join()
        self._connection.close()

    def _receive(self, expected: str):
        try:
            kind, payload = self._connection.recv()
        except EOFError:
            self._process.join(timeout=5)
            raise RuntimeError(f"the data check's template worker stopped (exit code {self._process.exitcode})") \
                from None
        if kind == "error":
            error_class, reason, where = payload
            raise error_class(reason, **where)
        if kind == "crash":
            raise RuntimeError(f"the data check's template worker failed:\n{payload}")
        assert kind == expected, (kind, expected)
        return payload


def _serve(connection, model_path: str, config) -> None:
    """The worker: load the tokenizer, say so, then measure each chunk of records sent until the pipe closes."""
    from stages.core.tokenizer_loading import load_tokenizer

    try:
        tokenizer, _ = load_tokenizer(model_path, config, alone=True)
        measure(tokenizer, [WARM_UP])  # compiles the template now, while the rows are still being read
        connection.send(("ready", None))
        while True:
            try:
                records = connection.recv()
            except EOFError:
                return
            connection.send(("lengths", measure(tokenizer, records)))
    except LorelayError as err:  # the user's to fix: sent whole, so this process prints the same line
        connection.send(("error", (type(err), err.reason, {"file": err.file, "line": err.line, "field": err.field,
                                                            "hint": err.hint})))
    except Exception:  # noqa: BLE001 - a bug: its traceback goes to the parent, which raises it
        connection.send(("crash", traceback.format_exc()))
