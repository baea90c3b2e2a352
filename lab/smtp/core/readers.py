"""Reading SMTP from bytes, for both sides: lines, command lines, message text up to its end, replies.

Every reader here is incremental and linear in its input: bytes arrive in any split, events come out the same.
The limits and line rules are docs/rules.md §3.6 and §3.9 (RFC 5321 4.5.3.1, 4.1.1.4, 2.3.8).
"""

from __future__ import annotations

import re
from typing import NamedTuple

from lab.smtp.core.errors import (
    BareCRInCommand,
    BareLFInCommand,
    CommandLineTooLong,
    MalformedReplyLine,
    NulInCommand,
    ReplyLineTooLong,
    TooManyReplyLines,
)
from lab.smtp.core.events import EndOfData, MalformedEndOfData, ReceivedReply, ReplyLine, TextProblem

COMMAND_LINE_LIMIT = 512  # octets including CRLF (RFC 5321 4.5.3.1.4)
TEXT_LINE_LIMIT = 1000  # octets including CRLF (RFC 5321 4.5.3.1.6)
#: Longest reply line a client accepts (RFC 5321 4.5.3.1.5 says 512; real servers exceed it, Postfix takes 2048).
MAX_REPLY_LINE = 2048
#: Most lines in one multi-line reply.
MAX_REPLY_LINES = 100

_REPLY_LINE = re.compile(rb"^([2-5][0-9][0-9])([ -]|$)(.*)$", re.DOTALL)
_LINE_BREAK = re.compile(rb"[\r\n]")


class LineReader:
    """Received bytes read line by line (up to LF) in linear time: an offset moves, the buffer is not re-copied.

    ``compact`` drops what was read (call it once per batch of input); ``_scan`` remembers how far a partial
    line was already searched for LF, so a line arriving a byte at a time is not searched again from its start.
    A partial line that outgrows its limit is dropped, and the line it ends up as is marked overlong.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._scan = 0
        self._discarding = False  # the head of the current line was dropped as overlong

    def __len__(self) -> int:
        return len(self._buf) - self._pos

    @property
    def discarding(self) -> bool:
        """The head of the line being read was dropped as overlong."""
        return self._discarding

    def feed(self, data: bytes) -> None:
        self._buf += data

    def line(self) -> bytes | None:
        """The next line with its LF, or None when no complete line is buffered."""
        end = self._buf.find(b"\n", max(self._pos, self._scan))
        if end < 0:
            self._scan = len(self._buf)
            return None
        line = bytes(self._buf[self._pos : end + 1])
        self._pos = self._scan = end + 1
        return line

    def bounded_line(self, max_partial: int) -> tuple[bytes, bool] | None:
        """The next line and whether its head was dropped; a partial line over ``max_partial`` is dropped."""
        line = self.line()
        if line is None:
            if len(self) > max_partial:
                self._discarding = True
                self.drop_partial()
            return None
        overlong, self._discarding = self._discarding, False
        return line, overlong

    def complete_lines(self, stop: bytes) -> bytes:
        """The buffered complete lines, up to and including the line end before the first ``stop`` (not read)."""
        end = self._buf.find(stop, self._pos)
        if end < 0:
            end = self._buf.rfind(b"\n", self._pos) + 1
        else:
            end += 2  # stop starts with the CRLF that ends the last line taken
        return bytes(self._buf[self._pos : max(end, self._pos)])

    def skip(self, count: int) -> None:
        """Mark ``count`` bytes as read (what ``complete_lines`` returned)."""
        self._pos += count
        self._scan = max(self._scan, self._pos)

    def take(self) -> bytes:
        """Everything not read yet, removed."""
        rest = bytes(self._buf[self._pos :])
        self.clear()
        return rest

    def drop_partial(self) -> None:
        """Forget a partial (overlong) line, but keep a trailing CR: the LF that may follow makes it a CRLF."""
        keep = self._buf[-1:] == b"\r"
        self._buf.clear()
        self._pos = self._scan = 0
        if keep:
            self._buf += b"\r"

    def clear(self) -> None:
        self._buf.clear()
        self._pos = self._scan = 0

    def compact(self) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._scan -= self._pos
            self._pos = 0


# -- command lines


def next_command_line(lines: LineReader) -> tuple[bytes, bool] | None:
    """The next command line and whether it was overlong (a partial line of 512 octets cannot end in time)."""
    return lines.bounded_line(COMMAND_LINE_LIMIT - 1)


def command_text(line: bytes, overlong: bool = False) -> str:
    """A command line (with its line end) checked and decoded, without CRLF; raises ``CommandLineError``."""
    if overlong or len(line) > COMMAND_LINE_LIMIT:
        raise CommandLineTooLong(line)
    if not line.endswith(b"\r\n"):
        raise BareLFInCommand(line)
    if b"\r" in line[:-2]:
        raise BareCRInCommand(line)
    if b"\x00" in line:
        raise NulInCommand(line)
    return line[:-2].decode("utf-8", errors="replace")


# -- message text (after the 354)


class DataReader:
    """Message text up to its end: only ``<CRLF>.<CRLF>`` ends it (RFC 5321 4.1.1.4, 2.3.8).

    A dot line after a bare LF or CR, or with anything but CRLF behind the dot, is message text, never the end
    (SMTP smuggling: CVE-2023-51764/51765/51766): ``next_event`` reports it once as ``MalformedEndOfData``, and
    the text is refused at the real end (``EndOfData.problem``), like any text with bare LF, bare CR or NUL.
    ``bare_lf_ends_data`` is a fault (``lab.smtp.faults``): any LF then ends a line, as broken MTAs did.
    """

    def __init__(self, lines: LineReader, max_size: int, *, bare_lf_ends_data: bool = False) -> None:
        self._lines = lines
        self._max_size = max_size
        self._bare_lf_ends_data = bare_lf_ends_data
        self._chunks: list[bytes] = []
        self._size = 0
        self._problems: set[TextProblem] = set()
        self._after_crlf = True  # the previous line ended in CRLF (the DATA command's counts for the first line)
        self._smuggling = False

    def next_event(self) -> EndOfData | MalformedEndOfData | None:
        """The next event, or None when more input is needed."""
        self._take_plain_lines()
        while True:
            taken = self._lines.bounded_line(TEXT_LINE_LIMIT)
            if taken is None:
                if self._lines.discarding:
                    self._problems.add(TextProblem.LINE_TOO_LONG)
                return None
            line, overlong = taken
            if self._bare_lf_ends_data:
                self._after_crlf = True
            after_crlf, self._after_crlf = self._after_crlf, line.endswith(b"\r\n")
            if overlong:  # the tail of an overlong line, never the terminator
                continue
            if line == b".\r\n" and after_crlf:
                return self._end()
            event = self._text_line(line, after_crlf)
            if event is not None:
                return event

    def _take_plain_lines(self) -> None:
        """Take at once the buffered lines that need no look one by one (the usual message text).

        Such a block is complete CRLF lines, none starting with a dot (no end of data, no dot-stuffing, no
        smuggling shape), with no other CR or LF, no NUL, none over the line limit, and it keeps the message
        under its size limit: ``_text_line`` would find no problem in any of them and keep each as it is.
        Anything else is left to the line-by-line reading.
        """
        if self._bare_lf_ends_data or not self._after_crlf or self._lines.discarding or self._problems:
            return
        block = self._lines.complete_lines(b"\r\n.")
        if not block or block[:1] == b"." or self._size + len(block) > self._max_size or b"\x00" in block:
            return
        crlf = block.count(b"\r\n")
        if block.count(b"\n") != crlf or block.count(b"\r") != crlf:
            return
        if max(map(len, block.split(b"\n"))) + 1 > TEXT_LINE_LIMIT:
            return
        self._lines.skip(len(block))
        self._chunks.append(block)
        self._size += len(block)

    def _text_line(self, line: bytes, after_crlf: bool) -> MalformedEndOfData | None:
        text = line[:-2] if self._after_crlf else line[:-1]
        problems = self._problems
        if not self._after_crlf:
            problems.add(TextProblem.BARE_LF)
        if b"\r" in text:
            problems.add(TextProblem.BARE_CR)
        if b"\x00" in text:
            problems.add(TextProblem.NUL)
        if len(line) > TEXT_LINE_LIMIT:
            problems.add(TextProblem.LINE_TOO_LONG)
        event = None
        if not self._smuggling and looks_like_end_of_data(line):
            self._smuggling = True
            event = MalformedEndOfData(line)
        if after_crlf and line.startswith(b"."):
            line = line[1:]
        self._size += len(line)
        if self._size > self._max_size:
            problems.add(TextProblem.OVERSIZE)
        if TextProblem.OVERSIZE not in problems and TextProblem.LINE_TOO_LONG not in problems:
            self._chunks.append(line)
        return event

    def _end(self) -> EndOfData:
        problem = next((p for p in TextProblem if p in self._problems), None)
        return EndOfData(b"".join(self._chunks) if problem is None else b"", problem)


def looks_like_end_of_data(line: bytes) -> bool:
    """A dot alone between line breaks of any kind, NULs aside: the shape of the SMTP smuggling variants."""
    return b"." in _LINE_BREAK.split(line.replace(b"\x00", b""))[:-1]


# -- replies (client side)


class ReplyLineFields(NamedTuple):
    """One reply line taken apart (RFC 5321 4.2): ``code``, the separator (``-`` goes on; space or none ends
    the reply), the ``text`` after it."""

    code: int
    separator: bytes
    text: bytes

    @property
    def last(self) -> bool:
        return self.separator != b"-"


def parse_reply_line(line: bytes) -> ReplyLineFields | None:
    """A reply line without its line end, taken apart; None when it does not start with a reply code."""
    match = _REPLY_LINE.match(line)
    if match is None:
        return None
    return ReplyLineFields(int(match.group(1)), match.group(2), match.group(3))


class ReplyReader:
    """Replies from a server, line by line (RFC 5321 4.2): ``code-text`` goes on, ``code text`` or ``code`` ends.

    ``next_line`` returns each line as it completes (for a transcript) and, on the last line of a reply, the
    reply; it raises a ``ReplyError`` carrying the offending input for an overlong line, a line without a
    three-digit code, or a reply of too many lines.
    """

    def __init__(self, max_line: int = MAX_REPLY_LINE, max_lines: int = MAX_REPLY_LINES) -> None:
        self._lines = LineReader()
        self._max_line = max_line
        self._max_lines = max_lines
        self._texts: list[bytes] = []
        self._raw: list[bytes] = []

    def feed(self, data: bytes) -> None:
        self._lines.feed(data)

    @property
    def unconsumed(self) -> int:
        """Bytes received and not yet returned as part of a complete reply."""
        return sum(len(raw) for raw in self._raw) + len(self._lines)

    def clear(self) -> None:
        """Forget everything received and not yet returned as a reply."""
        self._lines.clear()
        self._texts, self._raw = [], []

    def next_line(self) -> ReplyLine | None:
        raw = self._lines.line()
        if raw is None:
            self._lines.compact()
            if len(self._lines) > self._max_line:
                raise ReplyLineTooLong(self._lines.take(), None, f"reply line longer than {self._max_line} bytes")
            return None
        line = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
        if len(raw) > self._max_line:
            raise ReplyLineTooLong(raw, line, f"reply line longer than {self._max_line} bytes")
        fields = parse_reply_line(line)
        if fields is None:
            raise MalformedReplyLine(raw, line, "malformed reply line (no 3-digit code)")
        self._texts.append(fields.text)
        self._raw.append(raw)
        if len(self._texts) > self._max_lines:
            raise TooManyReplyLines(raw, line, f"reply of more than {self._max_lines} lines")
        if not fields.last:
            return ReplyLine(line, size=len(raw))
        reply = ReceivedReply(fields.code, tuple(self._texts), b"".join(self._raw))
        self._texts, self._raw = [], []
        return ReplyLine(line, reply, len(raw))

    def next_reply(self) -> ReceivedReply | None:
        """The next complete reply, skipping the lines before it; None when more input is needed."""
        while (event := self.next_line()) is not None:
            if event.reply is not None:
                return event.reply
        return None
