"""The ESMTP server session as a sans-IO state machine (after h11): bytes in, actions out.

The Twisted listener feeds it received bytes and carries out what it returns (send bytes, start TLS, close).
What it decides comes from the pure policy core: the command gate for the TLS mode, the STARTTLS rules of
SPEC.md 3, the limits of the effective mail flow policy. Delivery, MID numbering and the mail log are reached
through ``SessionHooks``, and delivery is an action (``Deliver``) whose outcome the listener reports back
with ``delivered``, so that the spool may be written off the reactor thread.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from lab.policy import gate, replies
from lab.policy.gate import GateFacts
from lab.policy.modes import Behaviour, ClientCert, TLSMode
from lab.policy.params import EffectiveParams
from lab.policy.replies import Reply

COMMAND_LINE_LIMIT = 512  # octets including CRLF (RFC 5321 4.5.3.1.4)
TEXT_LINE_LIMIT = 1000  # octets including CRLF (RFC 5321 4.5.3.1.6)
INJECTION_PREVIEW = 60

_PATH = re.compile(r"^\s*<([^<>\s]*)>(?:\s+(.*))?$")
_LINE_BREAK = re.compile(rb"[\r\n]")


# --- actions -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    data: bytes


@dataclass(frozen=True)
class StartTLS:
    """Begin the TLS handshake now; nothing more is sent in plaintext."""


@dataclass(frozen=True)
class Close:
    abort: bool = False  # True: drop the connection at once (TCPREFUSE, failed handshake)


@dataclass(frozen=True)
class Deliver:
    """Write ``message`` durably, then call ``ServerSession.delivered``; input waits until then."""

    message: Message


Action = Send | StartTLS | Close | Deliver


# --- what the session is given and gives -------------------------------------------------------------


class TLSInfo(Protocol):
    version: str
    cipher: str


@dataclass(frozen=True)
class Message:
    """An accepted message, handed to the spool before the 250 is sent."""

    mid: int
    sender: str
    recipients: tuple[str, ...]
    helo: str
    data: bytes
    tls: TLSInfo | None


class SessionHooks(Protocol):
    def new_mid(self) -> int: ...

    def event(self, name: str, **fields: Any) -> None:
        """A mail-log event (see ``lab.smtp.listener`` for the names)."""


@dataclass(frozen=True)
class SessionConfig:
    """Everything a session needs to know about its listener and the policy its peer matched."""

    hostname: str
    behaviour: Behaviour
    params: EffectiveParams
    accepts_recipient: Callable[[str], bool] = lambda _address: True


@dataclass
class _Transaction:
    mid: int
    sender: str
    recipients: list[str] = field(default_factory=list)


@dataclass
class _DataState:
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    too_long: bool = False
    bare_lf: bool = False
    bare_cr: bool = False
    nul: bool = False
    oversize: bool = False
    after_crlf: bool = True  # the previous line ended in CRLF (the DATA command's counts for the first line)
    smuggling: bool = False  # a dot line that is not <CRLF>.<CRLF> was seen (and kept as data)


class _LineReader:
    """Received bytes read line by line (up to LF) in linear time: an offset moves, the buffer is not re-copied.

    ``compact`` drops what was read, once per ``receive``; ``_scan`` remembers how far a partial line was already
    searched for LF, so a line arriving a byte at a time is not searched again from its start.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._scan = 0

    def __len__(self) -> int:
        return len(self._buf) - self._pos

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

    def take(self) -> bytes:
        """Everything not read yet, removed."""
        rest = bytes(self._buf[self._pos :])
        self.clear()
        return rest

    def drop_partial(self) -> None:
        """Forget a partial (overlong) line, but keep a trailing CR: the LF that may follow makes it a CRLF."""
        keep = self._buf[-1:] == b"\r"
        self.clear()
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


# --- the session -------------------------------------------------------------------------------------


class ServerSession:
    """One SMTP connection on the server side."""

    def __init__(self, config: SessionConfig, hooks: SessionHooks) -> None:
        self.config = config
        self.hooks = hooks
        self.greeting: str | None = None
        self.tls: TLSInfo | None = None
        self.client_cert = ClientCert.NONE
        self.tls_pending = False
        self.closed = False
        self.messages = 0
        self._reader = _LineReader()
        self._discarding_long_line = False
        self._transaction: _Transaction | None = None
        self._data: _DataState | None = None
        self._delivering: Message | None = None

    # -- facts

    @property
    def mode(self) -> TLSMode:
        return self.config.params.tls

    def facts(self) -> GateFacts:
        return GateFacts(
            mode=self.mode,
            tls_active=self.tls is not None,
            verify_client=self.config.params.verify_client,
            client_cert=self.client_cert,
            rejecting=self.config.behaviour is Behaviour.REJECT,
        )

    # -- entry points

    def start(self) -> list[Action]:
        """The connection is up: greet, refuse with 554, or drop it (TCPREFUSE)."""
        params = self.config.params
        if self.config.behaviour is Behaviour.TCPREFUSE:
            self.closed = True
            self.hooks.event("refused", reason="TCPREFUSE")
            return [Close(abort=True)]
        if self.config.behaviour is Behaviour.REJECT:
            self.hooks.event("refused", reason="REJECT")
            text = params.reject_banner_text or "Access denied"
            return [Send(Reply(params.reject_banner_code, "", f"{self.config.hostname} {text}").render())]
        text = params.banner_text or "ESMTP smtplab"
        return [Send(Reply(params.banner_code, "", f"{self.config.hostname} {text}").render())]

    def receive(self, data: bytes) -> list[Action]:
        """Bytes from the client (plaintext, or decrypted inside TLS)."""
        if self.closed or self.tls_pending:
            return []
        self._reader.feed(data)
        actions: list[Action] = []
        while self._reader and not self.closed and not self.tls_pending and self._delivering is None:
            if self._data is not None:
                more = self._take_data_line(actions)
            else:
                more = self._take_command_line(actions)
            if not more:
                break
        self._reader.compact()
        return actions

    def tls_started(self, info: TLSInfo, client_cert: ClientCert = ClientCert.NONE) -> list[Action]:
        """The handshake completed: forget everything from before it (RFC 3207 4.2)."""
        self.tls_pending = False
        self.tls = info
        self.client_cert = client_cert
        self.greeting = None
        self._transaction = None
        self._data = None
        self._reader.clear()
        self.hooks.event("tls_success", protocol=info.version, cipher=info.cipher)
        if self.config.params.verify_client:
            self.hooks.event("client_cert", state=client_cert.value)
        return []

    def tls_failed(self, reason: str) -> list[Action]:
        """The handshake failed: log it and close; nothing from this connection is delivered."""
        self.hooks.event("tls_failed", reason=reason)
        return self._close(abort=True)

    def connection_lost(self) -> None:
        if self._data is not None or self._transaction is not None:
            mid = self._transaction.mid if self._transaction else None
            self.hooks.event("message_refused", mid=mid, reason="connection lost before end of data")
        self._transaction = None
        self._data = None
        self.closed = True

    # -- line framing

    def _take_command_line(self, actions: list[Action]) -> bool:
        line = self._reader.line()
        if line is None:
            if len(self._reader) >= COMMAND_LINE_LIMIT:
                self._discarding_long_line = True
                self._reader.drop_partial()
            return False
        overlong, self._discarding_long_line = self._discarding_long_line, False
        actions.extend(self._command_line(line, overlong))
        return True

    def _command_line(self, line: bytes, overlong: bool = False) -> list[Action]:
        """Check one command line (with its line end) and execute it; ``overlong``: its head was discarded."""
        if overlong or len(line) > COMMAND_LINE_LIMIT:
            what, refusal = "command line too long", replies.LINE_TOO_LONG
        elif not line.endswith(b"\r\n"):
            what, refusal = "bare LF in command", replies.BARE_LF
        elif b"\r" in line[:-2]:
            what, refusal = "bare CR in command", replies.BARE_CR
        elif b"\x00" in line:
            what, refusal = "NUL byte in command", replies.NUL_BYTE
        else:
            return self._command(line[:-2].decode("utf-8", errors="replace"))
        self.hooks.event("protocol_error", what=what)
        return [Send(refusal.render())]

    def _take_data_line(self, actions: list[Action]) -> bool:
        """One line of message text; only <CRLF>.<CRLF> ends the data (RFC 5321 4.1.1.4, 2.3.8).

        A dot line after a bare LF or CR, or with anything but CRLF behind the dot, is message text, never the
        end (SMTP smuggling: CVE-2023-51764/51765/51766); the message is then refused at the real end of data
        with 550 5.6.0, like any text with bare LF, bare CR or NUL, so nothing after the false dot is executed.
        """
        state = self._data
        assert state is not None
        line = self._reader.line()
        if line is None:
            if len(self._reader) > TEXT_LINE_LIMIT:
                state.too_long = True
                self._discarding_long_line = True
                self._reader.drop_partial()
            return False
        after_crlf, state.after_crlf = state.after_crlf, line.endswith(b"\r\n")
        if self._discarding_long_line:  # the tail of an overlong line, never the terminator
            self._discarding_long_line = False
            return True
        if line == b".\r\n" and after_crlf:
            actions.extend(self._end_of_data(state))
            return True
        text = line[:-2] if state.after_crlf else line[:-1]
        if not state.after_crlf:
            state.bare_lf = True
        if b"\r" in text:
            state.bare_cr = True
        if b"\x00" in text:
            state.nul = True
        if len(line) > TEXT_LINE_LIMIT:
            state.too_long = True
        if not state.smuggling and _looks_like_end_of_data(line):
            state.smuggling = True
            mid = self._transaction.mid if self._transaction else None
            what = f"malformed end of data kept as message text (MID {mid}; SMTP smuggling?)"
            self.hooks.event("protocol_error", what=what)
        if after_crlf and line.startswith(b"."):
            line = line[1:]
        state.size += len(line)
        if state.size > self.config.params.max_message_size:
            state.oversize = True
        if not (state.oversize or state.too_long):
            state.chunks.append(line)
        return True

    # -- commands

    def _command(self, line: str) -> list[Action]:
        verb, _, argument = line.strip().partition(" ")
        verb = verb.upper()
        argument = argument.strip()
        refusal = gate.check(verb, bool(argument), self.facts())
        if refusal is not None:
            return [Send(refusal.render())]
        handler = getattr(self, f"_cmd_{verb.lower()}", None) if verb in gate.KNOWN_VERBS else None
        if handler is None:
            return [Send(replies.UNRECOGNIZED.render())]
        result: list[Action] = handler(argument)
        return result

    def _cmd_ehlo(self, argument: str) -> list[Action]:
        if not argument:
            return [Send(Reply(501, "5.5.4", "Syntax: EHLO hostname").render())]
        self.greeting = argument.split()[0]
        self._transaction = None
        caps = [
            f"{self.config.hostname} Hello {self.greeting}",
            "PIPELINING",
            f"SIZE {self.config.params.max_message_size}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
        ]
        if gate.advertises_starttls(self.facts()):
            caps.append("STARTTLS")
        caps.append("HELP")
        return [Send(Reply(250, "", caps[-1], tuple(caps[:-1])).render())]

    def _cmd_helo(self, argument: str) -> list[Action]:
        if not argument:
            return [Send(Reply(501, "5.5.4", "Syntax: HELO hostname").render())]
        self.greeting = argument.split()[0]
        self._transaction = None
        return [Send(Reply(250, "", self.config.hostname).render())]

    def _cmd_starttls(self, _argument: str) -> list[Action]:
        actions: list[Action] = [Send(replies.READY_TO_START_TLS.render()), StartTLS()]
        if self._reader:
            # SPEC.md 3.3: plaintext behind STARTTLS is never executed inside TLS (CVE-2011-0411).
            behind = self._reader.take()
            self.hooks.event("injection_discarded", nbytes=len(behind), preview=behind[:INJECTION_PREVIEW])
        self.tls_pending = True
        return actions

    def _cmd_mail(self, argument: str) -> list[Action]:
        if self.greeting is None:
            return [Send(replies.SEND_EHLO_FIRST.render())]
        if self._transaction is not None:
            return [Send(Reply(503, "5.5.1", "Nested MAIL command").render())]
        parsed = _parse_path(argument, "FROM:")
        if parsed is None:
            return [Send(Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>").render())]
        sender, params = parsed
        size = _size_param(params)
        if size is not None and size > self.config.params.max_message_size:
            return [Send(Reply(552, "5.3.4", "Message size exceeds fixed maximum message size").render())]
        refusal = gate.check_sender(sender, self.config.params.tls_mandatory_senders, self.facts())
        if refusal is not None:
            return [Send(refusal.render())]
        if self.messages >= self.config.params.max_msgs_per_connection:
            self.hooks.event("protocol_error", what="too many messages in this connection")
            reply = Reply(421, "4.3.2", f"{self.config.hostname} Too many messages in this connection")
            return [Send(reply.render()), *self._close()]
        mid = self.hooks.new_mid()
        self._transaction = _Transaction(mid, sender)
        self.hooks.event("mid_start", mid=mid)
        self.hooks.event("mid_from", mid=mid, address=sender)
        return [Send(Reply(250, "2.1.0", "Sender OK").render())]

    def _cmd_rcpt(self, argument: str) -> list[Action]:
        if self._transaction is None:
            return [Send(Reply(503, "5.5.1", "Need MAIL command").render())]
        parsed = _parse_path(argument, "TO:")
        if parsed is None or not parsed[0]:
            return [Send(Reply(501, "5.5.4", "Syntax: RCPT TO:<address>").render())]
        recipient = parsed[0]
        if len(self._transaction.recipients) >= self.config.params.max_rcpts_per_msg:
            return [Send(Reply(452, "4.5.3", "Too many recipients").render())]
        if not self.config.accepts_recipient(recipient):
            self.hooks.event("rcpt_refused", mid=self._transaction.mid, address=recipient, reason="RAT")
            return [Send(Reply(550, "5.7.1", "Recipient address rejected: relaying denied").render())]
        rid = len(self._transaction.recipients)
        self._transaction.recipients.append(recipient)
        self.hooks.event("mid_rcpt", mid=self._transaction.mid, rid=rid, address=recipient)
        return [Send(Reply(250, "2.1.5", "Recipient OK").render())]

    def _cmd_data(self, argument: str) -> list[Action]:
        if argument:
            return [Send(Reply(501, "5.5.4", "Syntax: DATA (no parameters)").render())]
        if self._transaction is None:
            return [Send(Reply(503, "5.5.1", "Need MAIL command").render())]
        if not self._transaction.recipients:
            return [Send(Reply(554, "5.5.1", "No valid recipients").render())]
        self._data = _DataState()
        return [Send(Reply(354, "", "End data with <CR><LF>.<CR><LF>").render())]

    def _cmd_rset(self, _argument: str) -> list[Action]:
        self._transaction = None
        return [Send(replies.OK.render())]

    def _cmd_noop(self, _argument: str) -> list[Action]:
        return [Send(replies.OK.render())]

    def _cmd_quit(self, _argument: str) -> list[Action]:
        return [Send(replies.BYE.render()), *self._close()]

    def _cmd_vrfy(self, _argument: str) -> list[Action]:
        return [Send(Reply(252, "2.5.2", "Cannot VRFY user, but will accept message").render())]

    def _cmd_expn(self, _argument: str) -> list[Action]:
        return [Send(Reply(502, "5.5.1", "EXPN not available").render())]

    def _cmd_help(self, _argument: str) -> list[Action]:
        return [Send(Reply(214, "2.0.0", "EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY STARTTLS").render())]

    def _cmd_auth(self, _argument: str) -> list[Action]:
        return [Send(Reply(502, "5.5.1", "AUTH not available").render())]

    # -- end of data

    def _end_of_data(self, state: _DataState) -> list[Action]:
        transaction = self._transaction
        assert transaction is not None
        self._data = None
        self._transaction = None
        refusal = None
        if state.oversize:
            refusal = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
        elif state.too_long:
            refusal = replies.LINE_TOO_LONG
        elif state.bare_lf:
            refusal = Reply(550, "5.6.0", "Message refused: bare LF in message text")
        elif state.bare_cr:
            refusal = Reply(550, "5.6.0", "Message refused: bare CR in message text")
        elif state.nul:
            refusal = Reply(550, "5.6.0", "Message refused: NUL byte in message text")
        if refusal is not None:
            self.hooks.event("message_refused", mid=transaction.mid, reason=refusal.text)
            return [Send(refusal.render())]
        message = Message(
            mid=transaction.mid,
            sender=transaction.sender,
            recipients=tuple(transaction.recipients),
            helo=self.greeting or "",
            data=b"".join(state.chunks),
            tls=self.tls,
        )
        self._delivering = message
        return [Deliver(message)]

    def delivered(self, error: str | None = None) -> list[Action]:
        """The spool's answer to ``Deliver``: 250 once the message is durable, else 451; then go on reading."""
        message = self._delivering
        assert message is not None, "delivered() without a pending Deliver"
        self._delivering = None
        if error is not None:
            self.hooks.event("message_refused", mid=message.mid, reason=f"spool error: {error}")
            reply = Reply(451, "4.3.0", "Local error in processing, try again later")
        else:
            self.messages += 1
            self.hooks.event("mid_ready", mid=message.mid, nbytes=len(message.data))
            reply = Reply(250, "2.0.0", f"Ok: queued as {message.mid}")
        if self.closed:
            return []
        return [Send(reply.render()), *self.receive(b"")]

    def _close(self, abort: bool = False) -> list[Action]:
        self.closed = True
        return [Close(abort=abort)]

    def shutdown(self) -> list[Action]:
        """The server is stopping (RFC 5321 3.8): ``421 4.3.2 <host> Service shutting down`` and close.

        A message being spooled keeps its turn: this returns nothing until ``delivered`` has sent its 250 (the
        listener asks again then). A TLS handshake in progress is aborted: there is no channel to answer on.
        """
        if self.closed or self._delivering is not None:
            return []
        if self.tls_pending:
            return self._close(abort=True)
        if self._transaction is not None:
            self.hooks.event("message_refused", mid=self._transaction.mid, reason="server shutting down")
        self._transaction = None
        self._data = None
        reply = replies.SHUTTING_DOWN
        text = f"{self.config.hostname} {reply.text}"
        return [Send(Reply(reply.code, reply.enhanced, text).render()), *self._close()]

    # -- what the listener's deadlines need (lab.policy.deadlines)

    @property
    def in_data(self) -> bool:
        """Between the 354 and the final dot: the listener bounds this phase as a whole."""
        return self._data is not None

    def deadline_expired(self, what: str, reply: Reply) -> list[Action]:
        """A deadline passed: log which, send ``reply`` (a 421, RFC 5321 4.5.3.2) and close."""
        if self.closed:
            return []
        self.hooks.event("protocol_error", what=what)
        return [Send(reply.render()), *self._close()]


def _looks_like_end_of_data(line: bytes) -> bool:
    """A dot alone between line breaks of any kind, NULs aside: the shape of the SMTP smuggling variants."""
    return b"." in _LINE_BREAK.split(line.replace(b"\x00", b""))[:-1]


def _parse_path(argument: str, keyword: str) -> tuple[str, str] | None:
    """``FROM:<a@b> SIZE=10`` -> (``a@b``, ``SIZE=10``); ``None`` on a syntax error."""
    if argument[: len(keyword)].upper() != keyword:
        return None
    match = _PATH.match(argument[len(keyword) :])
    if match is None:
        return None
    return match.group(1), match.group(2) or ""


def _size_param(params: str) -> int | None:
    for item in params.split():
        key, _, value = item.partition("=")
        if key.upper() == "SIZE" and value.isdigit():
            return int(value)
    return None
