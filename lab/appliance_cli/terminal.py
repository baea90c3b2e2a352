"""Where the CLI's questions go and its answers come from: a person at a terminal, or a script.

Interactive: ``input()`` with readline (line editing, history of this session, Tab completion of the words the
current prompt accepts). Scripted (``--script FILE``, or stdin that is not a terminal): one answer per line; each
prompt is printed with its answer after it, so that the output reads like the session a person would have had.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TextIO


class EndOfInput(Exception):
    """The answers ran out (end of the script, or Ctrl-D)."""


class Terminal:
    def __init__(self, answers: Iterable[str] | None, out: TextIO | None = None) -> None:
        """``answers`` None: ask a person with ``input()``; otherwise read one answer per item."""
        self.out = out or sys.stdout
        self.scripted = answers is not None
        self._answers: Iterator[str] | None = iter(answers) if answers is not None else None
        self.refused = 0  # answers refused (a scripted session with any ends with exit code 3)
        self._words: list[str] = []
        if not self.scripted:
            _setup_readline(self)

    def say(self, text: str = "") -> None:
        print(text, file=self.out)

    def ask(self, prompt: str, words: Iterable[str] = ()) -> str:
        """One answer, stripped; ``words`` are what Tab completes at this prompt."""
        self._words = list(words)
        if self._answers is None:
            try:
                return input(prompt).strip()
            except EOFError:
                self.out.write("\n")
                raise EndOfInput from None
        try:
            answer = next(self._answers).rstrip("\r\n")
        except StopIteration:
            self.out.write(prompt.rstrip() + "\n")
            raise EndOfInput from None
        self.out.write(f"{prompt}{answer}\n")
        return answer.strip()

    def refuse(self, line: str) -> None:
        """An answer the prompt cannot take: one line, then the prompt is asked again."""
        self.refused += 1
        self.say(line)

    def complete(self, text: str, state: int) -> str | None:
        matches = [word for word in self._words if word.lower().startswith(text.lower())]
        return matches[state] if state < len(matches) else None


def _setup_readline(terminal: Terminal) -> None:
    try:
        import readline
    except ImportError:  # pragma: no cover - every Linux Python has it
        return
    readline.set_completer(terminal.complete)
    readline.set_completer_delims(" \t")
    readline.parse_and_bind("tab: complete")


def script_lines(stream: TextIO) -> Iterator[str]:
    """The answers of a script: every line, ``#`` comment lines left out."""
    for line in stream:
        if not line.lstrip().startswith("#"):
            yield line
