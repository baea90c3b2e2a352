"""Protocol errors as typed exceptions, each carrying the input that caused it (after h11's ``ProtocolError``)."""

from __future__ import annotations

from typing import ClassVar


class ProtocolError(Exception):
    """The peer sent something the protocol does not allow; ``data`` is the offending input."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.data = data


# -- command lines (server side; docs/rules.md §3.6)


class CommandLineError(ProtocolError):
    """A command line refused before it is parsed; ``what`` is how the mail log names it."""

    what: ClassVar[str] = "malformed command line"


class CommandLineTooLong(CommandLineError):
    what = "command line too long"


class BareLFInCommand(CommandLineError):
    what = "bare LF in command"


class BareCRInCommand(CommandLineError):
    what = "bare CR in command"


class NulInCommand(CommandLineError):
    what = "NUL byte in command"


# -- replies (client side, RFC 5321 4.2)


class ReplyError(ProtocolError):
    """The server sent something that is not an SMTP reply.

    ``line`` is the complete line as received (without its line end), or None when the fault is in a line
    that has not ended yet; ``str()`` says what is wrong.
    """

    def __init__(self, data: bytes, line: bytes | None, message: str) -> None:
        super().__init__(data)
        self.line = line
        self.message = message

    def __str__(self) -> str:
        return self.message


class ReplyLineTooLong(ReplyError):
    pass


class MalformedReplyLine(ReplyError):
    pass


class TooManyReplyLines(ReplyError):
    pass


# -- the session's own state machine


class LocalProtocolError(Exception):
    """Our side tried a move its state table does not allow: a bug in the caller, never the peer's fault."""

    def __init__(self, state: object, trigger: object) -> None:
        super().__init__(f"{trigger} is not allowed in state {state}")
        self.state = state
        self.trigger = trigger
