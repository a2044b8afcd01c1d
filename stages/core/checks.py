"""The built-in checks: rewards a config uses without code (registered in ``stages.core.rewards.REWARDS``).

Each returns 1.0 (pass), 0.0 (fail) or None (does not apply to this row) per completion. A check that reads a
per-row reference (``column=``) does not apply to rows where that column is empty or null, so one dataset can
mix rows with and without, e.g. a sign-off expected on support replies only.

    rewards:
      - {fn: exact_match}                                    # against the `answer` column, normalised
      - {fn: ends_with, args: {column: sign_off}}            # per-row text; rows without one: n/a
      - {fn: not_contains, args: {text: [billing, technical]}, name: no_queue_label}
      - {fn: regex, args: {pattern: '^\\d+$', mode: full}}
      - {fn: json_valid, args: {schema: schemas/ticket.json}}
      - {fn: length, args: {max: 400}}
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path

from stages.core.errors import LorelayError
from stages.core.rewards import register, text_of

Texts = str | list[str] | None


def _column(columns: dict, name: str, rows: int) -> list:
    if name not in columns:
        available = [k for k in columns if k not in ("completion_ids", "trainer_state", "log_extra", "log_metric")]
        raise LorelayError(f"the data has no column '{name}' (columns: {', '.join(available) or 'none'})")
    values = list(columns[name])
    if len(values) != rows:
        raise LorelayError(f"column '{name}' has {len(values)} values for {rows} completions")
    return values


def _expected(text: Texts, column: str | None, columns: dict, rows: int) -> list[list[str] | None]:
    """Per row: the literal texts (``text``) or the row's own (``column``); None where the row has none."""
    if column is None:
        return [[text] if isinstance(text, str) else list(text)] * rows
    expected = []
    for value in _column(columns, column, rows):
        values = [value] if isinstance(value, str) else list(value or [])
        values = [v for v in values if isinstance(v, str) and v]
        expected.append(values or None)
    return expected


def _one_source(text: Texts = None, column: str | None = None, **_) -> None:
    if (text is None) == (column is None):
        raise ValueError("give exactly one of `text` (the same for every row) or `column` (a per-row reference)")
    if text is not None:
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
            raise ValueError("`text` must be a non-empty string or a list of them")


def _fold(value: str, ignore_case: bool) -> str:
    return value.casefold() if ignore_case else value


def _score(passed: list[bool | None]) -> list[float | None]:
    return [None if p is None else float(p) for p in passed]


@register("contains", check_args=_one_source)
def contains(prompts, completions, *, text: Texts = None, column: str | None = None, ignore_case: bool = False,
             any_of: bool = False, **columns) -> list[float | None]:
    """Pass when the completion contains the text (all listed texts; one of them with ``any_of``)."""
    expected = _expected(text, column, columns, len(completions))
    passed = []
    for completion, texts in zip(completions, expected):
        if texts is None:
            passed.append(None)
            continue
        reply = _fold(text_of(completion), ignore_case)
        found = [_fold(t, ignore_case) in reply for t in texts]
        passed.append(any(found) if any_of else all(found))
    return _score(passed)


@register("not_contains", check_args=_one_source)
def not_contains(prompts, completions, *, text: Texts = None, column: str | None = None, ignore_case: bool = False,
                 **columns) -> list[float | None]:
    """Pass when the completion contains none of the texts."""
    expected = _expected(text, column, columns, len(completions))
    return _score([None if texts is None else
                   not any(_fold(t, ignore_case) in _fold(text_of(c), ignore_case) for t in texts)
                   for c, texts in zip(completions, expected)])


@register("ends_with", check_args=_one_source)
def ends_with(prompts, completions, *, text: Texts = None, column: str | None = None, ignore_case: bool = False,
              **columns) -> list[float | None]:
    """Pass when the completion, trailing whitespace aside, ends with the text (one of them, for a list)."""
    expected = _expected(text, column, columns, len(completions))
    return _score([None if texts is None else
                   any(_fold(text_of(c).rstrip(), ignore_case).endswith(_fold(t.rstrip(), ignore_case))
                       for t in texts)
                   for c, texts in zip(completions, expected)])


def normalise(text: str) -> str:
    """Case, Unicode form, surrounding quotes/punctuation and runs of whitespace do not count."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = " ".join(text.split())
    return text.strip(" \"'`.,;:!?*_")


def _check_exact(column: str = "answer", normalize: bool = True, **_) -> None:
    if not isinstance(column, str) or not column:
        raise ValueError("`column` must name the reference column")


@register("exact_match", check_args=_check_exact)
def exact_match(prompts, completions, *, column: str = "answer", normalize: bool = True,
                **columns) -> list[float | None]:
    """Pass when the completion equals the row's reference (one of them, for a list); n/a without one."""
    expected = _expected(None, column, columns, len(completions))
    prepare = normalise if normalize else str.strip
    return _score([None if refs is None else prepare(text_of(c)) in {prepare(r) for r in refs}
                   for c, refs in zip(completions, expected)])


REGEX_MODES = ("search", "full", "match")


def _check_regex(pattern: str, mode: str = "search", ignore_case: bool = False, **_) -> None:
    if mode not in REGEX_MODES:
        raise ValueError(f"mode must be one of {', '.join(REGEX_MODES)}, got {mode!r}")
    try:
        re.compile(pattern)
    except (re.error, TypeError) as err:
        raise ValueError(f"invalid regular expression {pattern!r}: {err}") from None


@register("regex", check_args=_check_regex)
def regex(prompts, completions, *, pattern: str, mode: str = "search", ignore_case: bool = False,
          **columns) -> list[float]:
    """Pass when the pattern is found (search), matches the whole completion (full) or its start (match)."""
    compiled = re.compile(pattern, re.IGNORECASE if ignore_case else 0)
    match = {"search": compiled.search, "full": compiled.fullmatch, "match": compiled.match}[mode]
    return [float(match(text_of(c).strip() if mode == "full" else text_of(c)) is not None) for c in completions]


def _load_schema(schema: dict | str | None) -> dict | None:
    if schema is None or isinstance(schema, dict):
        return schema
    path = Path(schema)
    if not path.is_file():
        raise ValueError(f"schema file '{schema}' not found (a schema is a mapping, or a path to a .json file)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"schema file '{schema}' is not JSON: {err}") from None


def _validator(schema: dict | str | None):
    schema = _load_schema(schema)
    if schema is None:
        return None
    import jsonschema

    cls = jsonschema.validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as err:
        raise ValueError(f"invalid JSON schema: {err.message}") from None
    return cls(schema)


def _check_json(schema: dict | str | None = None, strip_fences: bool = True, **_) -> None:
    _validator(schema)


_FENCE = re.compile(r"^\s*```(?:json)?\s*\n(.*?)\n?```\s*$", re.DOTALL)


@register("json_valid", check_args=_check_json)
def json_valid(prompts, completions, *, schema: dict | str | None = None, strip_fences: bool = True,
               **columns) -> list[float]:
    """Pass when the completion parses as JSON (inside a ```json fence too) and, with a schema, validates."""
    validator = _validator(schema)
    scores = []
    for completion in completions:
        text = text_of(completion)
        fenced = _FENCE.match(text) if strip_fences else None
        try:
            value = json.loads(fenced.group(1) if fenced else text)
        except json.JSONDecodeError:
            scores.append(0.0)
            continue
        scores.append(float(validator is None or validator.is_valid(value)))
    return scores


LENGTH_UNITS = ("chars", "words", "tokens")


def _check_length(min: int | None = None, max: int | None = None, unit: str = "chars", **_) -> None:  # noqa: A002
    if min is None and max is None:
        raise ValueError("give `min`, `max` or both")
    for name, value in (("min", min), ("max", max)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"`{name}` must be a whole number >= 0, got {value!r}")
    if min is not None and max is not None and min > max:
        raise ValueError(f"`min` ({min}) is above `max` ({max})")
    if unit not in LENGTH_UNITS:
        raise ValueError(f"unit must be one of {', '.join(LENGTH_UNITS)}, got {unit!r}")


@register("length", check_args=_check_length)
def length(prompts, completions, *, min: int | None = None, max: int | None = None,  # noqa: A002
           unit: str = "chars", completion_ids: Sequence[Sequence[int]] | None = None,
           **columns) -> list[float]:
    """Pass when the completion's length (characters, words, or tokens from GRPO's completion_ids) is in bounds."""
    if unit == "tokens":
        if completion_ids is None:
            raise LorelayError("length in tokens reads completion_ids, which only GRPO passes; use unit chars or words")
        sizes = [len(ids) for ids in completion_ids]
    else:
        sizes = [len(text_of(c)) if unit == "chars" else len(text_of(c).split()) for c in completions]
    return [float((min is None or size >= min) and (max is None or size <= max)) for size in sizes]

