"""A swaks-style transcript of one client run: what mail admins already know how to read.

Markers: ``===`` notes, `` -> `` / `` ~> `` sent in plaintext / inside TLS, ``<-  `` / ``<~  `` received,
``<** `` errors. Lines hold no wall-clock time, so the same run gives the same transcript; the virtual time of
each line is kept beside it in ``times``.
"""

from __future__ import annotations

from collections.abc import Callable

NOTE = "=== "
SENT = " -> "
SENT_TLS = " ~> "
RECEIVED = "<-  "
RECEIVED_TLS = "<~  "
ERROR = "<** "

#: Longest piece of one line shown; the rest is summarised, so a hostile 100 kB line stays readable.
SHOW_MAX = 300
_NAMED = {0x09: "\\t", 0x0D: "\\r", 0x0A: "\\n", 0x00: "\\x00"}


def escape(data: bytes, limit: int = SHOW_MAX) -> str:
    """Printable ASCII as is, everything else as ``\\xNN`` (``\\t``, ``\\r``, ``\\n``, ``\\x00``), cut at ``limit``."""
    shown = data[:limit]
    out = "".join(chr(b) if 0x20 <= b < 0x7F else _NAMED.get(b, f"\\x{b:02x}") for b in shown)
    if len(data) > limit:
        out += f" [... {len(data) - limit} more bytes]"
    return out


def split_lines(data: bytes) -> list[str]:
    """Bytes as transcript lines: CRLF ends a line silently, a bare LF shows as ``\\n``, a bare CR as ``\\r``."""
    lines: list[str] = []
    pieces = data.split(b"\n")
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        if last and not piece:
            break
        if last:
            lines.append(escape(piece))  # an unterminated tail
        elif piece.endswith(b"\r"):
            lines.append(escape(piece[:-1]))
        else:
            lines.append(escape(piece) + "\\n")
    return lines


class Transcript:
    """An append-only list of marked lines, each with the virtual time it was written at."""

    def __init__(self, now: Callable[[], float] = lambda: 0.0) -> None:
        self._now = now
        self.lines: list[str] = []
        self.times: list[float] = []

    def _add(self, line: str) -> None:
        self.lines.append(line)
        self.times.append(self._now())

    def note(self, text: str) -> None:
        self._add(NOTE + text)

    def error(self, text: str) -> None:
        self._add(ERROR + text)

    def sent(self, data: bytes, *, tls: bool, max_lines: int | None = None) -> None:
        """Record bytes the client wrote; with ``max_lines`` a long message body is summarised."""
        marker = SENT_TLS if tls else SENT
        lines = split_lines(data)
        shown = lines if max_lines is None or len(lines) <= max_lines else lines[:max_lines]
        for line in shown:
            self._add(marker + line)
        if len(shown) < len(lines):
            self._add(f"{marker}[... {len(lines) - len(shown)} more lines, {len(data)} bytes in all]")

    def received(self, line: bytes, *, tls: bool) -> None:
        """Record one reply line (without its line ending)."""
        self._add((RECEIVED_TLS if tls else RECEIVED) + escape(line))
