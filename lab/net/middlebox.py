"""Middleboxes on a link: byte rewriters between a client and a server (docs/rules.md §5, STARTTLS stripping).

A middlebox is sans-IO: per connection it is handed the bytes travelling each way and returns what to forward
and what to answer itself (``Relay``). ``MiddleboxChain`` runs the boxes of one connection in a row; two shells
drive it. ``MiddleboxPipe`` runs it on the lab's own carriers, sitting directly below the client's
``SessionTransport``; so the capture, recorded there, holds the bytes as the CLIENT's wire shows them (after the
rewrite: what the client was tricked into seeing). ``lab.net.relay.MiddleboxRelay`` runs it in a TCP relay in
front of an external target. The server's view is the bytes that left the chain; a tap on the server side would
show the original ``250-STARTTLS``.

A middlebox object is configuration plus a log: ``open()`` gives the state for one connection, ``notes``
collects what it did over all connections (the runner prints them as ``=== middlebox ...`` lines).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.python.failure import Failure

from lab.errors import BadInput, HarnessError
from lab.net.capture import Direction
from lab.smtp.core.commands import parse_command
from lab.smtp.core.readers import ReplyLineFields, parse_reply_line

MAX_HELD = 4096  # a "line" longer than this is passed on as is: never stall a stream that is not SMTP text
TLS_RECORD_TYPES = frozenset({0x14, 0x15, 0x16, 0x17})  # ChangeCipherSpec, Alert, Handshake, ApplicationData
MAX_CHAIN_STEPS = 10_000


@dataclass
class Relay:
    """What a middlebox does with one chunk: ``forward`` goes on in the same direction, ``reply`` goes back."""

    forward: bytes = b""
    reply: bytes = b""


class MiddleboxSession(Protocol):
    def from_client(self, data: bytes) -> Relay: ...

    def from_server(self, data: bytes) -> Relay: ...

    def end(self, direction: Direction) -> Relay:
        """The sender in ``direction`` closed: release anything held back."""
        ...


class Middlebox(Protocol):
    notes: list[str]

    def open(self) -> MiddleboxSession: ...


class _LineBuffer:
    """Splits a byte stream into lines, and gives up (passes through) once it turns binary (TLS) or huge."""

    def __init__(self) -> None:
        self.held = b""
        self.binary = False

    def feed(self, data: bytes) -> tuple[list[bytes], bytes]:
        """Complete lines (with their line end), then raw bytes to pass through untouched."""
        if self.binary:
            return [], data
        buf = self.held + data
        self.held = b""
        lines: list[bytes] = []
        while buf:
            if buf[0] in TLS_RECORD_TYPES:  # a TLS record at a line start: no more text on this stream
                self.binary = True
                return lines, buf
            end = buf.find(b"\n")
            if end < 0:
                if len(buf) > MAX_HELD:
                    return lines, buf
                self.held = buf
                break
            lines.append(buf[: end + 1])
            buf = buf[end + 1 :]
        return lines, b""

    def flush(self) -> bytes:
        held, self.held = self.held, b""
        return held


_REWRITTEN = b"XXXXXXXA"  # same length as STARTTLS, as Cisco PIX/ASA "ESMTP inspection" writes it


def _without_line_end(line: bytes) -> bytes:
    return line[:-2] if line.endswith(b"\r\n") else line[:-1] if line.endswith(b"\n") else line


def _reply_fields(line: bytes) -> ReplyLineFields | None:
    """A server line (with its line end) as the SMTP core reads it."""
    return parse_reply_line(_without_line_end(line))


def _lists_starttls(fields: ReplyLineFields | None) -> bool:
    """``250-STARTTLS`` or ``250 STARTTLS`` (any case, trailing blanks): the EHLO reply's STARTTLS line."""
    return (
        fields is not None
        and fields.code == 250
        and fields.separator in (b"-", b" ")
        and fields.text.rstrip(b" \t").upper() == b"STARTTLS"
    )


def _is_starttls(line: bytes) -> bool:
    """A client line (with its line end) the SMTP core reads as the STARTTLS command."""
    return parse_command(_without_line_end(line).decode("utf-8", errors="replace")).verb == "STARTTLS"


class StartTLSStripper:
    """Hides STARTTLS from the client: rewrites the EHLO capability and/or answers STARTTLS itself.

    ``rewrite``: each server line ``250-STARTTLS`` / ``250 STARTTLS`` becomes ``250-XXXXXXXA`` / ``250 XXXXXXXA``
    (same length, continuation mark kept so the reply still ends where it ended). ``answer_starttls``: a code,
    e.g. 454; the client's STARTTLS is answered ``454 4.7.0 TLS not available`` and never reaches the server.
    Both work line by line, so a capability split across chunks is still caught; message bodies (between the
    server's 354 and the client's lone ``.``) are left alone.
    """

    def __init__(self, rewrite: bool = True, answer_starttls: int | None = None) -> None:
        if answer_starttls is not None and not (400 <= answer_starttls <= 599):
            raise BadInput(f"answer_starttls must be a 4xx or 5xx code, not {answer_starttls}", field="answer_starttls")
        self.rewrite = rewrite
        self.answer_starttls = answer_starttls
        self.notes: list[str] = []

    def open(self) -> _StripperSession:
        return _StripperSession(self)

    def answer_line(self) -> bytes:
        code = self.answer_starttls
        return f"{code} {(code or 400) // 100}.7.0 TLS not available\r\n".encode("ascii")


class _StripperSession:
    def __init__(self, box: StartTLSStripper) -> None:
        self.box = box
        self.client = _LineBuffer()
        self.server = _LineBuffer()
        self.in_body = False  # the server said 354: client lines are message content until "."

    def from_server(self, data: bytes) -> Relay:
        lines, rest = self.server.feed(data)
        out = []
        for line in lines:
            fields = _reply_fields(line)
            if fields is not None and fields.code == 354:
                self.in_body = True
            if self.box.rewrite and _lists_starttls(fields):
                new = line[:4] + _REWRITTEN + line[4 + len(_REWRITTEN) :]
                self.box.notes.append(
                    f"middlebox rewrote STARTTLS: {line.rstrip().decode('ascii')} -> {new.rstrip().decode('ascii')}"
                )
                line = new
            out.append(line)
        return Relay(forward=b"".join(out) + rest)

    def from_client(self, data: bytes) -> Relay:
        lines, rest = self.client.feed(data)
        forward, reply = [], []
        for line in lines:
            if self.in_body:
                if line.rstrip(b"\r\n") == b".":
                    self.in_body = False
            elif self.box.answer_starttls is not None and _is_starttls(line):
                answer = self.box.answer_line()
                self.box.notes.append(
                    f"middlebox answered STARTTLS itself: {answer.rstrip().decode('ascii')} (not forwarded)"
                )
                reply.append(answer)
                continue
            forward.append(line)
        return Relay(forward=b"".join(forward) + rest, reply=b"".join(reply))

    def end(self, direction: Direction) -> Relay:
        buf = self.client if direction is Direction.C2S else self.server
        return Relay(forward=buf.flush())


class MiddleboxChain:
    """Several middlebox sessions in a row (index 0 next to the client); answers travel back through the others."""

    def __init__(self, sessions: Sequence[MiddleboxSession]) -> None:
        self.sessions = list(sessions)

    @classmethod
    def open(cls, middleboxes: Sequence[Middlebox]) -> MiddleboxChain:
        """A chain with fresh per-connection state of each box (index 0 next to the client)."""
        return cls([box.open() for box in middleboxes])

    def from_client(self, data: bytes) -> tuple[bytes, bytes]:
        """(bytes for the server, bytes back to the client)."""
        return self._run([(0, Direction.C2S, data)])

    def from_server(self, data: bytes) -> tuple[bytes, bytes]:
        return self._run([(len(self.sessions) - 1, Direction.S2C, data)])

    def end(self, direction: Direction) -> tuple[bytes, bytes]:
        """Flush every box in the order the closing sender's bytes pass them."""
        order = range(len(self.sessions)) if direction is Direction.C2S else reversed(range(len(self.sessions)))
        to_server, to_client = b"", b""
        for i in order:
            held = self.sessions[i].end(direction).forward
            if held:
                step = 1 if direction is Direction.C2S else -1
                s, c = self._run([(i + step, direction, held)])
                to_server, to_client = to_server + s, to_client + c
        return to_server, to_client

    def _run(self, work: list[tuple[int, Direction, bytes]]) -> tuple[bytes, bytes]:
        n = len(self.sessions)
        to_server: list[bytes] = []
        to_client: list[bytes] = []
        steps = 0
        while work:
            steps += 1
            if steps > MAX_CHAIN_STEPS:
                raise HarnessError("middlebox chain does not settle (boxes keep answering each other)")
            i, direction, data = work.pop(0)
            if not data:
                continue
            if i >= n:
                to_server.append(data)
                continue
            if i < 0:
                to_client.append(data)
                continue
            box = self.sessions[i]
            relay = box.from_client(data) if direction is Direction.C2S else box.from_server(data)
            if direction is Direction.C2S:
                work.append((i + 1, Direction.C2S, relay.forward))
                work.append((i - 1, Direction.S2C, relay.reply))
            else:
                work.append((i - 1, Direction.S2C, relay.forward))
                work.append((i + 1, Direction.C2S, relay.reply))
        return b"".join(to_server), b"".join(to_client)


class MiddleboxPipe(TwistedProtocol):
    """Runs a chain between an upper protocol (the client's SessionTransport) and a lower transport.

    It is the lower transport's protocol and the upper protocol's raw pipe. Everything going up is delivered
    through ``clock.callLater(0)``, in order, so that a box's own answer never re-enters the client while it
    is still writing, and a close from below never overtakes data still on its way up.
    """

    def __init__(self, upper: Any, middleboxes: Sequence[Middlebox], clock: IReactorTime) -> None:
        self.upper = upper
        self.chain = MiddleboxChain.open(middleboxes)
        self.clock = clock
        self.lower: Any = None
        self._closing = False

    # -- from below

    def connectionMade(self) -> None:
        self.lower = self.transport
        self.upper.makeConnection(self)

    def dataReceived(self, data: bytes) -> None:
        to_server, to_client = self.chain.from_server(data)
        self._down(to_server)
        self._up(to_client)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        _, to_client = self.chain.end(Direction.S2C)
        self._up(to_client)
        self.clock.callLater(0, self.upper.connectionLost, reason)

    # -- from above (the raw pipe interface)

    def write(self, data: bytes) -> None:
        if self._closing:
            return
        to_server, to_client = self.chain.from_client(data)
        self._down(to_server)
        self._up(to_client)

    def writeSequence(self, seq: list[bytes]) -> None:
        self.write(b"".join(seq))

    def loseConnection(self) -> None:
        if self._closing:
            return
        to_server, _ = self.chain.end(Direction.C2S)
        self._down(to_server)
        self._closing = True
        self.lower.loseConnection()

    def abortConnection(self) -> None:
        self._closing = True
        self.lower.abortConnection()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.lower.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.lower.unregisterProducer()

    def getPeer(self) -> Any:
        return self.lower.getPeer()

    def getHost(self) -> Any:
        return self.lower.getHost()

    def _down(self, data: bytes) -> None:
        if data and not self._closing:
            self.lower.write(data)

    def _up(self, data: bytes) -> None:
        if data:
            self.clock.callLater(0, self.upper.dataReceived, data)
