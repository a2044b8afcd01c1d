"""One raw row seen through the spec's column names, and the checks of its fields and messages.

Every check fails with a ``RowError`` that names the row's file, line and the file's own field name
(``messages[2].content``).
"""

from __future__ import annotations

import json
import math
from typing import Any, NoReturn

from stages.core.data.spec import PASSTHROUGH_KEYS, ROLES, SHAREGPT_ROLES, Where, kind_of
from stages.core.errors import closest, did_you_mean

class Row:
    """A raw row seen through ``DatasetSpec.columns``: ``get("messages")`` reads the mapped column,
    and errors name the file's own column name."""

    def __init__(self, data: Any, where: Where, columns: dict[str, str]):
        if not isinstance(data, dict):
            raise where.error("not an object", f"expected a record (an object with named fields), "
                                               f"got {kind_of(data)}")
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
            self.fail("wrong type", f"expected a string, got {kind_of(value)}", self.column(name))
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

def parse_messages(row: Row, value: Any, column: str, *, as_role: str | None = None) -> list[dict]:
    """A checked message list; a plain string becomes one ``as_role`` message when that is given."""
    if isinstance(value, str) and as_role is not None:
        return [{"role": as_role, "content": parse_content(row, value, column, as_role, has_calls=False)}]
    if not isinstance(value, list):
        wanted = "a list of messages" + (" or a string" if as_role else "")
        hint = "CSV cells hold only text: keep message lists in JSONL, JSON or Parquet" \
            if isinstance(value, str) else None
        row.fail("wrong type", f"expected {wanted}, got {kind_of(value)}", column, hint)
    if not value:
        row.fail("empty conversation", "has no messages", column)
    return [_message(row, item, column, index) for index, item in enumerate(value)]


def _message(row: Row, item: Any, column: str, turn: int) -> dict:
    # Field names ("messages[2].content") are built only for an error: this runs for every message of
    # every row, and a valid message passes every check on its first comparison.
    if not isinstance(item, dict):
        row.fail("wrong type", "expected a message object with 'role' and 'content', "
                               f"got {kind_of(item)}", f"{column}[{turn}]")
    role = item.get("role")
    if role not in ROLES:
        _refuse_role(row, role, f"{column}[{turn}].role")
    calls = item.get("tool_calls")
    if calls is not None:
        _check_tool_calls(row, calls, f"{column}[{turn}].tool_calls")
    content = item.get("content")
    if not (isinstance(content, str) and content and not content.isspace()):  # else as parse_content says
        if "content" not in item and not calls:
            row.fail("missing field", "the message has no 'content'", f"{column}[{turn}].content")
        content = parse_content(row, content, f"{column}[{turn}].content", role, has_calls=bool(calls), turn=turn)
    message = {"role": role, "content": content}
    if len(item) > 2 or calls is not None:  # else only role and content: nothing to pass through
        for key in PASSTHROUGH_KEYS:
            if item.get(key) is not None:
                message[key] = item[key]
    return message


def _refuse_role(row: Row, role: Any, where: str) -> NoReturn:
    if role is None:
        row.fail("missing field", "the message has no role", where)
    if not isinstance(role, str):
        row.fail("wrong type", f"expected a role name, got {kind_of(role)}", where)
    hint = did_you_mean(role, ROLES)
    if hint is None and role in SHAREGPT_ROLES:
        hint = (f"'{role}' is a ShareGPT speaker name: use '{SHAREGPT_ROLES[role]}', "
                "or format: sharegpt")
    row.fail("unknown role", f"unknown role '{role}'; expected one of {', '.join(ROLES)}", where, hint)


def parse_content(row: Row, content: Any, where: str, role: str, *, has_calls: bool,
                  turn: int | None = None) -> str:
    """Message text. It may be empty (or null) only in an assistant message that calls tools.

    ``turn`` is the message's index in its conversation, named in the error (with the field).
    """
    allowed_empty = role == "assistant" and has_calls
    turn_text = f"turn {turn}: " if turn is not None else ""
    if content is None:
        if not allowed_empty:
            row.fail("null value", f"{turn_text}the {role} message's content is null", where)
        content = ""
    if not isinstance(content, str):
        row.fail("wrong type", f"expected text, got {kind_of(content)}", where)
    if not content.strip() and not allowed_empty:
        row.fail("empty content", f"{turn_text}the {role} message is empty or only whitespace", where)
    return content


def _check_tool_calls(row: Row, calls: Any, where: str) -> None:
    if not isinstance(calls, list) or not all(isinstance(call, dict) for call in calls):
        row.fail("wrong type", f"expected a list of tool-call objects, got {kind_of(calls)}", where)


def parse_tools(row: Row) -> list | None:
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
        row.fail("wrong type", f"expected a list of tool objects, got {kind_of(tools)}",
                 row.column("tools"))
    return tools or None


def check_ends_with_reply(row: Row, messages: list[dict], column: str) -> None:
    """SFT learns the assistant's turns: there must be one, and nothing may follow the last."""
    roles = [message["role"] for message in messages]
    if "assistant" not in roles:
        row.fail("no assistant turn", "has no assistant turn: there is no reply to learn from", column)
    if roles[-1] != "assistant":
        row.fail("ends without assistant turn",
                 f"ends with a '{roles[-1]}' turn after the last assistant reply; it would teach "
                 "nothing",
                 f"{column}[{len(roles) - 1}]", "drop the trailing turns, or add the assistant's answer")


def check_only_replies(row: Row, messages: list[dict], column: str, offset: int = 0) -> None:
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            row.fail("non-assistant reply", f"holds a '{message['role']}' message where only the "
                                            "assistant's reply may be",
                     f"{column}[{index + offset}].role")

