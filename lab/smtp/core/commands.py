"""Command syntax (RFC 5321 4.1.1): the verb and argument of a command line, and the path of MAIL and RCPT."""

from __future__ import annotations

import re

from lab.smtp.core.events import Command, Path

_PATH = re.compile(r"^\s*<([^<>\s]*)>(?:\s+(.*))?$")


def parse_command(text: str) -> Command:
    """``mail FROM:<a@b>`` -> ``Command("MAIL", "FROM:<a@b>")`` (the line end already removed)."""
    verb, _, argument = text.strip().partition(" ")
    return Command(verb.upper(), argument.strip())


def parse_path(argument: str, keyword: str) -> Path | None:
    """``FROM:<a@b> SIZE=10`` with keyword ``FROM:`` -> ``Path("a@b", "SIZE=10")``; None on a syntax error."""
    if argument[: len(keyword)].upper() != keyword:
        return None
    match = _PATH.match(argument[len(keyword) :])
    if match is None:
        return None
    return Path(match.group(1), match.group(2) or "")
