"""Formats -> records: one converter per row format, and the format declared or detected."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from stages.core.data.fields import (Row, check_ends_with_reply, check_only_replies, parse_content,
                                     parse_messages, parse_tools)
from stages.core.data.spec import KIND_FORMATS, SHAREGPT_ROLES, SIGNATURES, DatasetSpec, kind_of
from stages.core.errors import ConfigError, DataError, closest, did_you_mean


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """``messages`` led by the spec's system prompt, unless they have a system message already."""
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


# ----------------------------------------------------------------------------------------------
# Formats -> records
# ----------------------------------------------------------------------------------------------

def _chat_record(row: Row, spec: DatasetSpec, messages: list[dict], tools: list | None = None) -> dict:
    return {"messages": with_system_prompt(messages, spec.system_prompt), "tools": tools,
            "source": row.where.source}


def _from_messages(row: Row, spec: DatasetSpec) -> dict:
    column = row.column("messages")
    messages = parse_messages(row, row.get("messages"), column)
    check_ends_with_reply(row, messages, column)
    return _chat_record(row, spec, messages, parse_tools(row))


def _from_sharegpt(row: Row, spec: DatasetSpec) -> dict:
    column = row.column("conversations")
    turns = row.get("conversations")
    if not isinstance(turns, list):
        row.fail("wrong type", f"expected a list of turns, got {kind_of(turns)}", column)
    if not turns:
        row.fail("empty conversation", "has no turns", column)
    messages = [_sharegpt_turn(row, turn, f"{column}[{index}]", index) for index, turn in enumerate(turns)]
    system = row.text("system", required=False)
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    check_ends_with_reply(row, messages, column)
    return _chat_record(row, spec, messages, parse_tools(row))


def _sharegpt_turn(row: Row, turn: Any, where: str, index: int) -> dict:
    if not isinstance(turn, dict):
        row.fail("wrong type", f"expected a turn object with 'from' and 'value', got {kind_of(turn)}",
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
                 f"turn {index}: unknown speaker '{speaker}'; expected one of {', '.join(SHAREGPT_ROLES)}",
                 f"{where}.{speaker_key}", did_you_mean(speaker, SHAREGPT_ROLES))
    value = turn.get(value_key)
    if speaker == "function_call":
        if value is None or (isinstance(value, str) and not value.strip()):
            row.fail("empty content", f"turn {index}: the function_call turn is empty",
                     f"{where}.{value_key}")
        calls = _sharegpt_tool_calls(row, value, f"{where}.{value_key}")
        return {"role": "assistant", "content": "", "tool_calls": calls}
    role = SHAREGPT_ROLES[speaker]
    return {"role": role, "content": parse_content(row, value, f"{where}.{value_key}", role, has_calls=False,
                                                   turn=index)}


SHAPE = '{"name": ..., "arguments": {...}}'


def _sharegpt_tool_calls(row: Row, value: Any, where: str) -> list[dict]:
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


def _from_alpaca(row: Row, spec: DatasetSpec) -> dict:
    instruction = row.text("instruction")
    extra = row.text("input", required=False)
    output = row.text("output")
    system = row.text("system", required=False)
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return _chat_record(row, spec, messages)


def _from_prompt_completion(row: Row, spec: DatasetSpec) -> dict:
    prompt = parse_messages(row, row.get("prompt"), row.column("prompt"), as_role="user")
    column = row.column("completion")
    completion = parse_messages(row, row.get("completion"), column, as_role="assistant")
    check_ends_with_reply(row, completion, column)
    return _chat_record(row, spec, prompt + completion, parse_tools(row))


def _from_text(row: Row, spec: DatasetSpec) -> dict:
    return {"text": row.text("text"), "source": row.where.source}


def _from_preference(row: Row, spec: DatasetSpec) -> dict:
    chosen_raw, rejected_raw = row.get("chosen"), row.get("rejected")
    if row.has("prompt") and not _holds_whole_conversation(chosen_raw, rejected_raw):
        prompt, chosen, rejected = _explicit_pair(row, chosen_raw, rejected_raw)
    else:
        prompt, chosen, rejected = _implicit_pair(row, chosen_raw, rejected_raw)
    if chosen == rejected:
        row.fail("identical chosen and rejected", "is identical to chosen: the pair teaches nothing",
                 row.column("rejected"))
    return {"prompt": with_system_prompt(prompt, spec.system_prompt), "chosen": chosen,
            "rejected": rejected, "margin": _margin(row), "source": row.where.source}


def _holds_whole_conversation(chosen: Any, rejected: Any) -> bool:
    # UltraFeedback-style rows give a `prompt` and also repeat it inside chosen/rejected; those are
    # split like implicit pairs (the `prompt` column is then redundant).
    return any(isinstance(side, list)
               and any(isinstance(m, dict) and m.get("role") != "assistant" for m in side)
               for side in (chosen, rejected))


def _explicit_pair(row: Row, chosen_raw: Any, rejected_raw: Any) -> tuple[list, list, list]:
    prompt = parse_messages(row, row.get("prompt"), row.column("prompt"), as_role="user")
    sides = []
    for name, raw in (("chosen", chosen_raw), ("rejected", rejected_raw)):
        messages = parse_messages(row, raw, row.column(name), as_role="assistant")
        check_only_replies(row, messages, row.column(name))
        sides.append(messages)
    return prompt, sides[0], sides[1]


def _implicit_pair(row: Row, chosen_raw: Any, rejected_raw: Any) -> tuple[list, list, list]:
    """Split two whole conversations at their longest common prefix: that prefix is the prompt."""
    if isinstance(chosen_raw, str) or isinstance(rejected_raw, str):
        row.fail("missing field", "required field is missing", row.column("prompt"),
                 "chosen and rejected are plain strings, so the prompt must be given; only whole "
                 "conversations (message lists) may leave it out")
    chosen = parse_messages(row, chosen_raw, row.column("chosen"))
    rejected = parse_messages(row, rejected_raw, row.column("rejected"))
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
        check_only_replies(row, messages[shared:], row.column(name), offset=shared)
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _margin(row: Row) -> float | None:
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


def _from_kto(row: Row, spec: DatasetSpec) -> dict:
    if row.has("messages") and not row.has("prompt"):
        prompt, completion = _kto_conversation(row)
    else:
        prompt = parse_messages(row, row.get("prompt"), row.column("prompt"), as_role="user")
        column = row.column("completion")
        completion = parse_messages(row, row.get("completion"), column, as_role="assistant")
        check_only_replies(row, completion, column)
    label = row.flag("kto_tag" if row.column("kto_tag") in row.data else "label")
    return {"prompt": with_system_prompt(prompt, spec.system_prompt), "completion": completion,
            "label": label, "source": row.where.source}


def _kto_conversation(row: Row) -> tuple[list[dict], list[dict]]:
    """LLaMA-Factory's KTO layout: one conversation, whose final assistant turns are the completion."""
    column = row.column("messages")
    messages = parse_messages(row, row.get("messages"), column)
    check_ends_with_reply(row, messages, column)
    start = len(messages)
    while start > 0 and messages[start - 1]["role"] == "assistant":
        start -= 1
    if start == 0:
        row.fail("no shared prompt", "has only assistant turns: there is no prompt to judge the reply to",
                 column)
    return messages[:start], messages[start:]


CONVERTERS = {
    "messages": _from_messages, "sharegpt": _from_sharegpt, "alpaca": _from_alpaca,
    "prompt_completion": _from_prompt_completion, "text": _from_text, "preference": _from_preference,
    "kto": _from_kto,
}


# ----------------------------------------------------------------------------------------------
# Format: declared or detected
# ----------------------------------------------------------------------------------------------

def formats_for(kind: str) -> tuple[str, ...]:
    if kind not in KIND_FORMATS:
        raise ConfigError(f"unknown data kind '{kind}'; expected one of {', '.join(KIND_FORMATS)}",
                          field="kind", hint=did_you_mean(kind, KIND_FORMATS))
    return KIND_FORMATS[kind]


def settle_format(spec: DatasetSpec, kind: str, row: Row) -> str:
    """The declared format, or the one the first record's keys show; either must suit ``kind``."""
    _check_mapped_columns(spec, row)
    allowed = formats_for(kind)
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


def _undetected(spec: DatasetSpec, row: Row, allowed: Sequence[str]) -> DataError:
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


def _check_mapped_columns(spec: DatasetSpec, row: Row) -> None:
    for ours, theirs in spec.columns.items():
        if theirs not in row.data:
            keys = [str(key) for key in row.data]
            raise ConfigError(f"maps '{ours}' to column '{theirs}', but the first record of "
                              f"{spec.path} has no such column (it has {', '.join(keys)})",
                              field=f"columns.{ours}", hint=did_you_mean(theirs, keys))

