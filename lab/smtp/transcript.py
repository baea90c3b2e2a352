"""A swaks-style transcript of one client run, kept as structured entries; the marked text is a view of them.

Each ``Entry`` says when (seconds since the client started, on its clock), which way (sent, received, a note or
an error), whether it travelled inside TLS, the text shown, the step that wrote it and, for notes and errors,
what kind of note it is. ``Entry.line`` renders the markers mail admins already read: ``===`` notes,
`` -> `` / `` ~> `` sent in plaintext / inside TLS, ``<-  `` / ``<~  `` received, ``<** `` errors. Code that
needs to know what happened reads the fields (``direction``, ``tls``, ``kind``), never the rendered line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

NOTE = "=== "
SENT = " -> "
SENT_TLS = " ~> "
RECEIVED = "<-  "
RECEIVED_TLS = "<~  "
ERROR = "<** "

#: Longest piece of one line shown; the rest is summarised, so a hostile 100 kB line stays readable.
SHOW_MAX = 300
_NAMED = {0x09: "\\t", 0x0D: "\\r", 0x0A: "\\n", 0x00: "\\x00"}


class Direction(StrEnum):
    """Which way an entry went: bytes the client sent or received, a note from the lab, an error."""

    SENT = "sent"
    RECEIVED = "received"
    NOTE = "note"
    ERROR = "error"


class Kind(StrEnum):
    """What a note or error is about, so that readers (the probe, the reports) never match its text."""

    TRYING = "trying"
    CONNECTED = "connected"
    CONNECT_FAILED = "connect-failed"
    TLS_STARTED = "tls-started"
    CERT_CHECKED = "cert-checked"
    HANDSHAKE_FAILED = "handshake-failed"
    HANDSHAKE_ABORTED = "handshake-aborted"
    RESPONSE_INJECTION_DISCARDED = "response-injection-discarded"
    INJECTING = "injecting"
    INJECTION_EXECUTED = "injection-executed"
    PLAINTEXT_AFTER_220 = "plaintext-after-220"
    DECISION = "decision"
    EXPECTATION = "expectation"
    EXTRA_REPLIES = "extra-replies"
    BAD_REPLY = "bad-reply"
    TIMEOUT = "timeout"
    CLOSED = "closed"
    NOT_CONNECTED = "not-connected"
    SUMMARY = "summary"  # the rest of a long message body, counted
    MIDDLEBOX = "middlebox"
    MAILLOG = "maillog"  # a line the target appended to its mail log during the run
    DEMO_CERTIFICATE = "demo-certificate"  # how a demo-certificate case stands in against another MTA
    HARNESS = "harness"
    RECEIVER = "receiver"  # a command a receiver of a sender run read (lab.sender), plaintext or inside TLS


def _marker(direction: Direction, tls: bool) -> str:
    if direction is Direction.SENT:
        return SENT_TLS if tls else SENT
    if direction is Direction.RECEIVED:
        return RECEIVED_TLS if tls else RECEIVED
    return NOTE if direction is Direction.NOTE else ERROR


@dataclass(frozen=True)
class Entry:
    """One transcript line as data. ``size`` is the wire bytes it stands for (line ending included), if any."""

    direction: Direction
    text: str
    tls: bool = False
    time: float | None = None
    step: str | None = None
    kind: Kind | None = None
    size: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "direction", Direction(self.direction))
        if self.kind is not None:
            object.__setattr__(self, "kind", Kind(self.kind))

    @property
    def line(self) -> str:
        """The swaks-style rendering: marker, then text."""
        return _marker(self.direction, self.tls) + self.text

    @property
    def plaintext(self) -> bool:
        """Bytes that crossed the wire unencrypted."""
        return self.direction in (Direction.SENT, Direction.RECEIVED) and not self.tls

    def to_dict(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "direction": str(self.direction),
            "tls": self.tls,
            "text": self.text,
            "step": self.step,
            "kind": None if self.kind is None else str(self.kind),
            "size": self.size,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Entry:
        return cls(**data)


def note(text: str, kind: Kind, **fields: Any) -> Entry:
    """A note from the lab outside the client (a middlebox, the harness)."""
    return Entry(Direction.NOTE, text, kind=kind, **fields)


def error(text: str, kind: Kind, **fields: Any) -> Entry:
    return Entry(Direction.ERROR, text, kind=kind, **fields)


def render(entries: Iterable[Entry]) -> list[str]:
    """The swaks-style text view of ``entries``."""
    return [entry.line for entry in entries]


def escape(data: bytes, limit: int = SHOW_MAX) -> str:
    """Printable ASCII as is, everything else as ``\\xNN`` (``\\t``, ``\\r``, ``\\n``, ``\\x00``), cut at ``limit``."""
    shown = data[:limit]
    text = shown.decode("latin-1")  # one character per byte
    if text.isascii() and text.isprintable():  # the common case: nothing to escape (0x20-0x7e)
        out = text
    else:
        out = "".join(chr(b) if 0x20 <= b < 0x7F else _NAMED.get(b, f"\\x{b:02x}") for b in shown)
    if len(data) > limit:
        out += f" [... {len(data) - limit} more bytes]"
    return out


def split_lines(data: bytes) -> list[str]:
    """Bytes as transcript lines: CRLF ends a line silently, a bare LF shows as ``\\n``, a bare CR as ``\\r``."""
    return [text for text, _ in _sized_lines(data)]


def _sized_lines(data: bytes) -> list[tuple[str, int]]:
    """``split_lines`` with the wire size of each line (its line ending included)."""
    lines: list[tuple[str, int]] = []
    pieces = data.split(b"\n")
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        if last and not piece:
            break
        if last:
            lines.append((escape(piece), len(piece)))  # an unterminated tail
        elif piece.endswith(b"\r"):
            lines.append((escape(piece[:-1]), len(piece) + 1))
        else:
            lines.append((escape(piece) + "\\n", len(piece) + 1))
    return lines


class Transcript:
    """An append-only list of entries; ``step`` labels what the client is doing when an entry is written."""

    def __init__(self, now: Callable[[], float] = lambda: 0.0) -> None:
        self._now = now
        self._start = now()
        self.entries: list[Entry] = []
        self.step: str | None = None

    @property
    def lines(self) -> list[str]:
        return render(self.entries)

    @property
    def times(self) -> list[float | None]:
        return [entry.time for entry in self.entries]

    def _add(
        self, direction: Direction, text: str, *, tls: bool = False, kind: Kind | None = None, size: int | None = None
    ) -> None:
        when = round(self._now() - self._start, 6)
        self.entries.append(Entry(direction, text, tls, when, self.step, kind, size))

    def note(self, text: str, kind: Kind) -> None:
        self._add(Direction.NOTE, text, kind=kind)

    def error(self, text: str, kind: Kind) -> None:
        self._add(Direction.ERROR, text, kind=kind)

    def sent(self, data: bytes, *, tls: bool, max_lines: int | None = None) -> None:
        """Record bytes the client wrote; with ``max_lines`` a long message body is summarised."""
        lines = _sized_lines(data)
        shown = lines if max_lines is None or len(lines) <= max_lines else lines[:max_lines]
        for text, size in shown:
            self._add(Direction.SENT, text, tls=tls, size=size)
        if len(shown) < len(lines):
            rest = sum(size for _, size in lines[len(shown) :])
            text = f"[... {len(lines) - len(shown)} more lines, {len(data)} bytes in all]"
            self._add(Direction.SENT, text, tls=tls, kind=Kind.SUMMARY, size=rest)

    def received(self, line: bytes, *, tls: bool, size: int) -> None:
        """Record one reply line (without its line ending); ``size`` counts the line ending too."""
        self._add(Direction.RECEIVED, escape(line), tls=tls, size=size)


_LEGACY = (
    (NOTE, Direction.NOTE, False),
    (ERROR, Direction.ERROR, False),
    (SENT, Direction.SENT, False),
    (SENT_TLS, Direction.SENT, True),
    (RECEIVED, Direction.RECEIVED, False),
    (RECEIVED_TLS, Direction.RECEIVED, True),
)


def from_legacy_line(line: str) -> Entry:
    """An entry from a line of a schema_version 1 record, which stored only the rendered text (upgrade only).

    The marker gives direction and layer; time, step, kind and size were never stored, so they stay None. A line
    without a known marker becomes a note whose rendering is the line itself minus nothing it did not have.
    """
    for marker, direction, tls in _LEGACY:
        if line.startswith(marker):
            return Entry(direction, line[len(marker) :], tls)
    raise ValueError(f"not a transcript line: {line[:40]!r}")
