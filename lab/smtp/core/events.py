"""What crosses the wire, as typed values: commands, replies, message text; and the server session's log events.

``Reply`` is a reply as a server sends it (rendered here, the one place replies are written); ``ReceivedReply``
is a reply as a client reads it (``readers.ReplyReader``). Log events are what the server session reports for
the mail log; the listener maps each to its mail-log line (docs/maillog.md).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar

# -- replies


@dataclass(frozen=True)
class Reply:
    """A reply to send: code, enhanced status code (RFC 3463, may be empty), text, and any lines before it."""

    code: int
    enhanced: str = ""
    text: str = ""
    lines: tuple[str, ...] = ()  # extra lines of a multi-line reply, before ``text``
    #: The reply on the wire, CRLF-terminated; multi-line replies use ``code-`` (RFC 5321 4.2.1). Worked out once,
    #: when the reply is made: the common ones are constants, sent by every session.
    wire: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        body = [*self.lines, self.text]
        last = len(body) - 1
        out = []
        for i, line in enumerate(body):
            sep = " " if i == last else "-"
            prefix = f"{self.enhanced} " if self.enhanced and i == last else ""
            out.append(f"{self.code}{sep}{prefix}{line}".rstrip() + "\r\n")
        object.__setattr__(self, "wire", "".join(out).encode("utf-8"))  # frozen: set once, here


@dataclass(frozen=True)
class ReceivedReply:
    """One (possibly multi-line) reply as read from a server."""

    code: int
    lines: tuple[bytes, ...]  # the text of each line, after "250-" / "250 "
    raw: bytes  # the reply as received, line ends included

    @property
    def size(self) -> int:
        """Bytes on the wire, line ends included."""
        return len(self.raw)

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def text(self) -> str:
        """The reply without its final line end, as text (continuation lines joined by CRLF)."""
        raw = self.raw[:-2] if self.raw.endswith(b"\r\n") else self.raw[:-1]
        return raw.decode("utf-8", "replace")


@dataclass(frozen=True)
class ReplyLine:
    """One line of a reply as read (without its line end); ``reply`` is set on the line that completes one."""

    line: bytes
    reply: ReceivedReply | None = None
    size: int = 0  # bytes on the wire, line end included


# -- commands and message text


@dataclass(frozen=True)
class Command:
    """A command line: the verb in upper case, the argument stripped (RFC 5321 4.1.1)."""

    verb: str
    argument: str = ""


@dataclass(frozen=True)
class Path:
    """The path of ``MAIL FROM:`` / ``RCPT TO:`` (without angle brackets) and the parameters after it."""

    address: str
    parameters: str = ""

    def size(self) -> int | None:
        """The ``SIZE=`` parameter (RFC 1870), if given as a number."""
        for item in self.parameters.split():
            key, _, value = item.partition("=")
            if key.upper() == "SIZE" and value.isdigit():
                return int(value)
        return None


class TextProblem(enum.Enum):
    """Why message text is refused at its end of data (the first that applies, in this order)."""

    OVERSIZE = "oversize"
    LINE_TOO_LONG = "line too long"
    BARE_LF = "bare LF"
    BARE_CR = "bare CR"
    NUL = "NUL"


@dataclass(frozen=True)
class EndOfData:
    """``<CRLF>.<CRLF>``: the message text (dot-unstuffed), or the problem it is refused for."""

    text: bytes
    problem: TextProblem | None = None


@dataclass(frozen=True)
class MalformedEndOfData:
    """A dot line that is not ``<CRLF>.<CRLF>`` (SMTP smuggling?): kept as text; reported once per message."""

    line: bytes


# -- what the server session reports for the mail log (lab.smtp.listener maps each to one line)


@dataclass(frozen=True)
class LogEvent:
    kind: ClassVar[str]

    def fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class ConnectionRefused(LogEvent):
    kind = "refused"
    reason: str


@dataclass(frozen=True)
class TLSEstablished(LogEvent):
    kind = "tls_success"
    protocol: str
    cipher: str


@dataclass(frozen=True)
class TLSFailed(LogEvent):
    kind = "tls_failed"
    reason: str


@dataclass(frozen=True)
class ClientCertChecked(LogEvent):
    kind = "client_cert"
    state: str


@dataclass(frozen=True)
class InjectionDiscarded(LogEvent):
    kind = "injection_discarded"
    nbytes: int
    preview: bytes


@dataclass(frozen=True)
class ProtocolViolation(LogEvent):
    kind = "protocol_error"
    what: str


@dataclass(frozen=True)
class MessageStarted(LogEvent):
    kind = "mid_start"
    mid: int


@dataclass(frozen=True)
class SenderAccepted(LogEvent):
    kind = "mid_from"
    mid: int
    address: str


@dataclass(frozen=True)
class RecipientAccepted(LogEvent):
    kind = "mid_rcpt"
    mid: int
    rid: int
    address: str


@dataclass(frozen=True)
class RecipientRefused(LogEvent):
    kind = "rcpt_refused"
    mid: int
    address: str
    reason: str


@dataclass(frozen=True)
class MessageReady(LogEvent):
    kind = "mid_ready"
    mid: int
    nbytes: int


@dataclass(frozen=True)
class MessageRefused(LogEvent):
    kind = "message_refused"
    mid: int | None
    reason: str
