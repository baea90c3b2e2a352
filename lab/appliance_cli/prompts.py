"""The appliance's way of asking: a question, a numbered menu or an operations list, the default in brackets.

An answer a prompt cannot take is refused with one line and the prompt is asked again. An empty answer takes
the default; at an operations prompt (``[]>``) it goes back one level.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from lab.appliance_cli.terminal import Terminal

T = TypeVar("T")


def ask_value(term: Terminal, question: str, default: str, check: Callable[[str], T], words: Sequence[str] = ()) -> T:
    """A free answer, checked by ``check`` (which raises ``ValueError`` with the one-line reason)."""
    while True:
        term.say()
        term.say(question)
        answer = term.ask(f"[{default}]> ", words) or default
        try:
            return check(answer)
        except ValueError as exc:
            term.refuse(f"Error: {exc}")


def ask_number(term: Terminal, question: str, default: int, low: int, high: int) -> int:
    def check(text: str) -> int:
        if not text.isdigit() or not low <= int(text) <= high:
            raise ValueError(f"enter a whole number from {low} to {high}")
        return int(text)

    return ask_value(term, question, str(default), check)


def ask_yes_no(term: Terminal, question: str, default: bool) -> bool:
    def check(text: str) -> bool:
        word = text.strip().lower()
        if word in ("y", "yes"):
            return True
        if word in ("n", "no"):
            return False
        raise ValueError("answer Y or N")

    return ask_value(term, question, "Y" if default else "N", check, ("Y", "N"))


def ask_choice(term: Terminal, question: str, options: Sequence[str], default: int) -> int:
    """A numbered menu; the answer is the number (1-based) or the option's text. Returns the 0-based index."""
    while True:
        term.say()
        term.say(question)
        for number, option in enumerate(options, 1):
            term.say(f"{number}. {option}")
        answer = term.ask(f"[{default + 1}]> ", options) or str(default + 1)
        if answer.isdigit() and 1 <= int(answer) <= len(options):
            return int(answer) - 1
        named = [i for i, option in enumerate(options) if option.lower() == answer.lower()]
        if named:
            return named[0]
        term.refuse(f"Error: {answer!r} is not a choice: enter a number from 1 to {len(options)}")


def ask_operation(term: Terminal, operations: Sequence[tuple[str, str]], question: str | None = None) -> str | None:
    """An operations list (``- EDIT - Modify a listener.``); the chosen word in upper case, None for going back."""
    names = [name for name, _ in operations]
    while True:
        term.say()
        term.say(question or "Choose the operation you want to perform:")
        for name, what in operations:
            term.say(f"- {name} - {what}")
        answer = term.ask("[]> ", [n.lower() for n in names]).upper()
        if not answer:
            return None
        if answer in names:
            return answer
        term.refuse(f"Error: {answer.lower()!r} is not one of: {', '.join(n.lower() for n in names)}")


def ask_item(term: Terminal, question: str, items: Sequence[str]) -> int | None:
    """An entry of a list, by number or name (``Enter the name or number of ...``); None for going back."""
    while True:
        term.say()
        term.say(question)
        answer = term.ask("[]> ", items)
        if not answer:
            return None
        if answer.isdigit() and 1 <= int(answer) <= len(items):
            return int(answer) - 1
        named = [i for i, item in enumerate(items) if item.lower() == answer.lower()]
        if named:
            return named[0]
        term.refuse(f"Error: {answer!r} is neither a number from 1 to {len(items)} nor a name listed above")


def ask_several(term: Terminal, question: str, options: Sequence[str], default: Sequence[int]) -> list[int]:
    """A numbered menu taking several answers separated by commas (numbers or texts); the 0-based indexes in
    menu order. ``default`` is what an empty answer takes."""
    shown = ",".join(str(i + 1) for i in default)
    while True:
        term.say()
        term.say(question)
        for number, option in enumerate(options, 1):
            term.say(f"{number}. {option}")
        answer = term.ask(f"Enter one or more, separated by commas. [{shown}]> ", options) or shown
        chosen: set[int] = set()
        for word in (w.strip() for w in answer.split(",")):
            if word.isdigit() and 1 <= int(word) <= len(options):
                chosen.add(int(word) - 1)
            elif word.lower() in (o.lower() for o in options):
                chosen.add([o.lower() for o in options].index(word.lower()))
            else:
                term.refuse(f"Error: {word[:60]!r} is not a choice: enter numbers from 1 to {len(options)}")
                break
        else:
            if chosen:
                return sorted(chosen)
            term.refuse("Error: choose at least one")
