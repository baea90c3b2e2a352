"""Answer checks the dialogs share (the loader's rules for names and host names, docs/config-format.md)."""

from __future__ import annotations

import re
from collections.abc import Callable

from lab.names import hostname_problem

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(taken: list[str]) -> Callable[[str], str]:
    def check(text: str) -> str:
        if not NAME.match(text):
            raise ValueError("a name is 1-64 letters, digits, '_', '.', '-', starting with a letter or digit")
        if text in taken:
            raise ValueError(f"{text!r} is already used")
        return text

    return check


def check_host(empty_ok: bool) -> Callable[[str], str]:
    def check(text: str) -> str:
        if text.lower() in ("", "none") and empty_ok:
            return ""
        problem = hostname_problem(text)
        if problem:
            raise ValueError(problem)
        return text

    return check
