"""User-facing errors.

Anything a person can fix (a bad config key, a malformed data row, a missing file) is raised as
``LorelayError``. The CLI prints its message and exits with status 2: no traceback, because the
traceback would only point at lorelay's code while the fault is in the user's input.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path


class LorelayError(Exception):
    """An error caused by the user's input, with a message that says where and what to do."""

    def __init__(self, message: str, *, file: str | Path | None = None, line: int | None = None,
                 field: str | None = None, hint: str | None = None):
        self.file = str(file) if file is not None else None
        self.line = line
        self.field = field
        self.hint = hint
        self.reason = message
        super().__init__(self._render())

    def _render(self) -> str:
        where = ""
        if self.file is not None:
            where = self.file + (f":{self.line}" if self.line is not None else "")
        if self.field is not None:
            where += (" " if where else "") + f"field '{self.field}'"
        text = f"{where}: {self.reason}" if where else self.reason
        if self.hint:
            text += f" ({self.hint})"
        return text


class DataError(LorelayError):
    """A data file or row that cannot be used."""


class ConfigError(LorelayError):
    """A config file, key or value that cannot be used."""


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The valid name a typo most likely meant, or None when nothing is close."""
    matches = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None


def did_you_mean(name: str, choices: Iterable[str]) -> str | None:
    guess = closest(name, choices)
    return f"did you mean '{guess}'?" if guess else None


def first_line(err: BaseException) -> str:
    """The first non-blank line of a library's error message (its name when the message is empty)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
