"""Typed errors and the exit codes they map to.

Every error a user can cause is a ``BadInput`` that knows the file, line and field at fault, so the command
line prints one line and exits 3 instead of a traceback.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_HARNESS = 2
EXIT_BAD_INPUT = 3

#: How much of a user's value an error message quotes, and the most one message says.
EXCERPT_CHARS = 60
MAX_MESSAGE_CHARS = 400


def excerpt(value: object, limit: int = EXCERPT_CHARS, *, quote: bool = True) -> str:
    """``repr(value)`` (``str`` without ``quote``) on one line, cut to ``limit`` characters with ``...``.

    Error messages quote what the user wrote, but a hostile file's value can be megabytes long.
    """
    if quote and isinstance(value, str):
        return repr(value[:limit]) + ("..." if len(value) > limit else "")
    if quote:
        text = _SHORT.repr(value)  # bounded work: reprlib looks at the first few items and characters only
    else:
        text = _one_line(str(value)[: 2 * limit])
    return text if len(text) <= limit else text[:limit] + "..."


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 2 * EXCERPT_CHARS
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 4
_SHORT.maxlevel = 3


def _one_line(text: str) -> str:
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


@dataclass
class BadInput(Exception):
    """A malformed file, flag or value; ``str()`` is the one-line message shown to the user."""

    problem: str
    file: str | None = None
    line: int | None = None
    field: str | None = None

    def __str__(self) -> str:
        where = ""
        if self.file:
            file = _one_line(self.file)
            where = file if self.line is None else f"{file}:{self.line}"
            where += ": "
        field = f"{self.field}: " if self.field else ""
        problem = _one_line(self.problem)  # a last guard: whatever a message quotes, it stays one short line
        if len(problem) > MAX_MESSAGE_CHARS:
            problem = problem[: MAX_MESSAGE_CHARS - 3] + "..."
        return f"{where}{field}{problem}"


class HarnessError(Exception):
    """The lab itself failed (not the system under test): exit 2, never a FAILED verdict."""
