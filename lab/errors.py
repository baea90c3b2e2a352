"""Typed errors and the exit codes they map to.

Every error a user can cause is a ``BadInput`` that knows the file, line and field at fault, so the command
line prints one line and exits 3 instead of a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_HARNESS = 2
EXIT_BAD_INPUT = 3


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
            where = self.file if self.line is None else f"{self.file}:{self.line}"
            where += ": "
        field = f"{self.field}: " if self.field else ""
        return f"{where}{field}{self.problem}"


class HarnessError(Exception):
    """The lab itself failed (not the system under test): exit 2, never a FAILED verdict."""
