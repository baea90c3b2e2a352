"""The ESMTP server session as a sans-IO state machine (after h11): bytes in, actions out.

The Twisted listener feeds it received bytes and carries out what it returns (send a reply, start TLS, close).
Reading and writing SMTP is ``lab.smtp.core``; the session's phase is one ``ServerState`` moved through the
core's transition table. What it decides comes from the pure policy core: the command gate for the TLS mode,
the STARTTLS rules of docs/rules.md §3, the limits of the effective mail flow policy. Delivery, MID numbering
and the mail log are reached through ``SessionHooks``: log events are typed (``lab.smtp.core.events``), and
delivery is an action (``Deliver``) whose outcome the listener reports back with ``delivered``, so that the
spool may be written off the reactor thread. A ``FaultPolicy`` (``lab.smtp.faults``) breaks chosen rules on
purpose; the listener's sessions have none.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from lab.policy import gate, replies
from lab.policy.gate import GateFacts
from lab.policy.modes import Behaviour, ClientCert, TLSMode
from lab.policy.params import EffectiveParams
from lab.smtp.core import errors, events
from lab.smtp.core.commands import parse_command, parse_path
from lab.smtp.core.events import EndOfData, LogEvent, Reply, TextProblem
from lab.smtp.core.readers import (
    COMMAND_LINE_LIMIT,
    TEXT_LINE_LIMIT,
    DataReader,
    LineReader,
    command_text,
    next_command_line,
)
from lab.smtp.core.state import COMMAND_STATES, Move, ServerState, ServerStateMachine
from lab.smtp.faults import NO_FAULTS, FaultPolicy

__all__ = [
    "COMMAND_LINE_LIMIT",
    "LAB_TEXTS",
    "TEXT_LINE_LIMIT",
    "ServerSession",
    "SessionConfig",
    "SessionHooks",
    "Texts",
]

INJECTION_PREVIEW = 60

#: The reply to each kind of refused command line (docs/rules.md §3.6).
COMMAND_LINE_REFUSALS: dict[type[errors.CommandLineError], Reply] = {
    errors.CommandLineTooLong: replies.LINE_TOO_LONG,
    errors.BareLFInCommand: replies.BARE_LF,
    errors.BareCRInCommand: replies.BARE_CR,
    errors.NulInCommand: replies.NUL_BYTE,
}

#: The reply at the end of data to message text refused for each problem.
TEXT_REFUSALS: dict[TextProblem, Reply] = {
    TextProblem.OVERSIZE: Reply(552, "5.3.4", "Message size exceeds fixed maximum message size"),
    TextProblem.LINE_TOO_LONG: replies.LINE_TOO_LONG,
    TextProblem.BARE_LF: Reply(550, "5.6.0", "Message refused: bare LF in message text"),
    TextProblem.BARE_CR: Reply(550, "5.6.0", "Message refused: bare CR in message text"),
    TextProblem.NUL: Reply(550, "5.6.0", "Message refused: NUL byte in message text"),
}


# --- actions -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    """Write ``data``: the rendering of ``reply`` when the session answers (``Send.reply``)."""

    data: bytes
    reply: Reply | None = field(default=None, compare=False)

    @classmethod
    def of(cls, reply: Reply) -> Send:
        return cls(reply.wire, reply)


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
    @property
    def version(self) -> str: ...

    @property
    def cipher(self) -> str: ...


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

    def log_event(self, event: LogEvent) -> None:
        """A mail-log event (``lab.smtp.core.events``; the listener writes each as one line)."""


SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")


@dataclass(frozen=True)
class Texts:
    """The texts of the session's positive replies: the lab's listener's, or another MTA's (the remote MTA's).

    ``ehlo_first`` is formatted with ``hostname`` and ``greeting`` (the client's EHLO name); ``extensions``
    (listed before STARTTLS) and ``last_extensions`` (after it) with ``size``, the maximum message size.
    """

    ehlo_first: str = "{hostname} Hello {greeting}"
    extensions: tuple[str, ...] = ("PIPELINING", "SIZE {size}", "8BITMIME", "ENHANCEDSTATUSCODES")
    last_extensions: tuple[str, ...] = ("HELP",)
    sender_ok: Reply = SENDER_OK
    recipient_ok: Reply = RECIPIENT_OK
    ok: Reply = replies.OK


LAB_TEXTS = Texts()


@functools.lru_cache(maxsize=256)
def _same_reply(code: int, text: str) -> Send:
    """A reply that every session of a listener sends alike (its banner, the 354), made once."""
    return Send.of(Reply(code, "", text))


@functools.lru_cache(maxsize=1024)
def _ehlo_reply(texts: Texts, hostname: str, greeting: str, size: int, starttls: bool) -> Send:
    """The EHLO reply, made once for each set of what it depends on (a client that comes back gets the same)."""
    caps = [texts.ehlo_first.format(hostname=hostname, greeting=greeting)]
    caps += [extension.format(size=size) for extension in texts.extensions]
    if starttls:
        caps.append("STARTTLS")
    caps += [extension.format(size=size) for extension in texts.last_extensions]
    return Send.of(Reply(250, "", caps[-1], tuple(caps[:-1])))


@dataclass(frozen=True)
class SessionConfig:
    """Everything a session needs to know about its listener and the policy its peer matched.

    ``on_command`` is told every command line taken (as text, before it is checked), for a shell that keeps a
    record of what its clients said.
    """

    hostname: str
    behaviour: Behaviour
    params: EffectiveParams
    accepts_recipient: Callable[[str], bool] = lambda _address: True
    faults: FaultPolicy = NO_FAULTS
    texts: Texts = LAB_TEXTS
    on_command: Callable[[str], None] | None = None


@dataclass
class _Transaction:
    mid: int
    sender: str
    recipients: list[str] = field(default_factory=list)


# --- the session -------------------------------------------------------------------------------------


class ServerSession:
    """One SMTP connection on the server side."""

    def __init__(self, config: SessionConfig, hooks: SessionHooks) -> None:
        self.config = config
        self.hooks = hooks
        self.machine = ServerStateMachine()
        self.greeting: str | None = None  # the EHLO/HELO name (GREETING: none yet)
        self.tls: TLSInfo | None = None
        self.client_cert = ClientCert.NONE
        self._facts: GateFacts | None = None
        self.messages = 0
        self._reader = LineReader()
        self._transaction: _Transaction | None = None  # TRANSACTION, DATA: the envelope
        self._data: DataReader | None = None  # DATA: the message text so far
        self._delivering: Message | None = None  # DELIVERING: the message the spool is writing
        self._answer_hello: bytes | None = None  # the ``answer_client_hello`` fault, armed by the 220
        self._stalled = False  # the ``stall_handshake`` fault, armed by the 220: nothing is ever answered

    # -- state and facts

    @property
    def state(self) -> ServerState:
        return self.machine.state

    @property
    def closed(self) -> bool:
        return self.machine.state is ServerState.CLOSED

    @property
    def tls_pending(self) -> bool:
        return self.machine.state is ServerState.TLS_PENDING

    @property
    def mode(self) -> TLSMode:
        return self.config.params.tls

    def facts(self) -> GateFacts:
        """What the command gate needs; it changes only when TLS starts (``tls_started``)."""
        if self._facts is None:
            self._facts = GateFacts(
                mode=self.mode,
                tls_active=self.tls is not None,
                verify_client=self.config.params.verify_client,
                client_cert=self.client_cert,
                rejecting=self.config.behaviour is Behaviour.REJECT,
            )
        return self._facts

    def _log(self, event: LogEvent) -> None:
        self.hooks.log_event(event)

    # -- entry points

    def start(self) -> list[Action]:
        """The connection is up: greet, refuse with 554, or drop it (TCPREFUSE)."""
        params = self.config.params
        if self.config.behaviour is Behaviour.TCPREFUSE:
            self._log(events.ConnectionRefused("TCPREFUSE"))
            return self._close(abort=True)
        if self.config.behaviour is Behaviour.REJECT:
            self._log(events.ConnectionRefused("REJECT"))
            text = params.reject_banner_text or "Access denied"
            return [_same_reply(params.reject_banner_code, f"{self.config.hostname} {text}")]
        text = params.banner_text or "ESMTP smtplab"
        return [_same_reply(params.banner_code, f"{self.config.hostname} {text}")]

    def receive(self, data: bytes) -> list[Action]:
        """Bytes from the client (plaintext, or decrypted inside TLS)."""
        if self._stalled:
            return []
        if self._answer_hello is not None and data and not self.closed:
            answer, self._answer_hello = self._answer_hello, None
            return [Send(answer), *self._close()]  # the ClientHello answered with what is not a ServerHello
        if self.closed or self.tls_pending:
            return []
        self._reader.feed(data)
        actions: list[Action] = []
        while self._reader:
            if self.state is ServerState.DATA:
                more = self._take_data(actions)
            elif self.state in COMMAND_STATES:
                more = self._take_command_line(actions)
            else:
                break
            if not more:
                break
        self._reader.compact()
        return actions

    def tls_started(self, info: TLSInfo, client_cert: ClientCert = ClientCert.NONE) -> list[Action]:
        """The handshake completed: forget everything from before it (RFC 3207 4.2)."""
        greeting, transaction = self.greeting, self._transaction
        self.machine.move(Move.TLS_ESTABLISHED)
        self.tls = info
        self.client_cert = client_cert
        self._facts = None
        self.greeting = None
        self._transaction = None
        self._data = None
        kept = self._reader.take() if self.config.faults.execute_injection else b""
        self._reader.clear()
        self._log(events.TLSEstablished(info.version, info.cipher))
        if self.config.params.verify_client:
            self._log(events.ClientCertChecked(client_cert.value))
        faults = self.config.faults
        keep_greeting = faults.keep_state_across_tls or faults.keep_greeting_across_tls
        keep_envelope = faults.keep_state_across_tls or faults.keep_envelope_across_tls
        self._restore(greeting if keep_greeting else None, transaction if keep_envelope else None)
        if kept:
            return self.receive(kept)
        return []

    def tls_failed(self, reason: str) -> list[Action]:
        """The handshake failed: log it and close; nothing from this connection is delivered."""
        self._log(events.TLSFailed(reason))
        return self._close(abort=True)

    def connection_lost(self) -> None:
        if self._data is not None or self._transaction is not None:
            mid = self._transaction.mid if self._transaction else None
            self._log(events.MessageRefused(mid, "connection lost before end of data"))
        self._transaction = None
        self._data = None
        if not self.closed:
            self.machine.move(Move.CLOSE)

    # -- command lines

    def _take_command_line(self, actions: list[Action]) -> bool:
        taken = next_command_line(self._reader)
        if taken is None:
            return False
        actions.extend(self._command_line(*taken))
        return True

    def _command_line(self, line: bytes, overlong: bool = False) -> list[Action]:
        """Check one command line (with its line end) and execute it; ``overlong``: its head was discarded."""
        try:
            text = command_text(line, overlong)
        except errors.CommandLineError as error:
            faults = self.config.faults
            if (isinstance(error, errors.CommandLineTooLong) and faults.long_command_lines and not overlong) or (
                isinstance(error, errors.NulInCommand) and faults.nul_in_commands
            ):
                return self._command(line[:-2].replace(b"\x00", b"").decode("utf-8", errors="replace"))
            self._log(events.ProtocolViolation(error.what))
            return [Send.of(COMMAND_LINE_REFUSALS[type(error)])]
        return self._command(text)

    def _command(self, line: str) -> list[Action]:
        if self.config.on_command is not None:
            self.config.on_command(line)
        command = parse_command(line)
        verb, argument = command.verb, command.argument
        faults = self.config.faults
        unverified = self.tls is not None and self.client_cert is not ClientCert.VERIFIED
        if verb == "EHLO" and faults.close_unverified is not None and unverified:
            return [Send.of(faults.close_unverified), *self._close()]
        bypass = verb in faults.served_before_tls and self.mode is TLSMode.REQUIRED and self.tls is None
        if not bypass:
            refusal = gate.check(verb, bool(argument), self.facts())
            if refusal is not None and not self._served_by_fault(verb, refusal):
                return [Send.of(refusal)]
        handler = getattr(self, f"_cmd_{verb.lower()}", None) if verb in gate.KNOWN_VERBS else None
        if handler is None:
            return [Send.of(replies.UNRECOGNIZED)]
        result: list[Action] = handler(argument)
        return result

    def _served_by_fault(self, verb: str, refusal: Reply) -> bool:
        """A fault of ``config.faults`` serves a STARTTLS the command gate refuses with ``refusal``."""
        faults = self.config.faults
        return verb == "STARTTLS" and (
            (refusal == replies.STARTTLS_NOT_IMPLEMENTED and faults.serve_unadvertised_starttls)
            or (refusal == replies.STARTTLS_NO_PARAMETERS and faults.starttls_takes_argument)
            or (refusal == replies.TLS_ALREADY_ACTIVE and faults.starttls_in_tls is not None)
        )

    def _greet(self, name: str) -> None:
        """EHLO/HELO accepted: a new greeting and no transaction (RFC 5321 4.1.4)."""
        self.greeting = name
        self._transaction = None
        self.machine.move(Move.GREETED)

    def _restore(self, greeting: str | None, transaction: _Transaction | None) -> None:
        """The ``keep_*_across_tls`` faults: put back what the client said before the handshake."""
        if greeting is not None:
            self._greet(greeting)
        if transaction is not None:
            if greeting is None:
                self.machine.move(Move.GREETED)
            self._transaction = transaction
            self.machine.move(Move.MAIL_ACCEPTED)

    def _cmd_ehlo(self, argument: str) -> list[Action]:
        if not argument:
            return [Send.of(Reply(501, "5.5.4", "Syntax: EHLO hostname"))]
        config, transaction, greeting = self.config, self._transaction, argument.split()[0]
        self._greet(greeting)
        if config.faults.keep_envelope_across_tls and transaction is not None:
            self._transaction = transaction
            self.machine.move(Move.MAIL_ACCEPTED)
        starttls = gate.advertises_starttls(self.facts()) or (
            self.tls is not None and config.faults.advertise_starttls_in_tls
        )
        return [_ehlo_reply(config.texts, config.hostname, greeting, config.params.max_message_size, starttls)]

    def _cmd_helo(self, argument: str) -> list[Action]:
        if not argument:
            return [Send.of(Reply(501, "5.5.4", "Syntax: HELO hostname"))]
        self._greet(argument.split()[0])
        return [Send.of(Reply(250, "", self.config.hostname))]

    def _cmd_starttls(self, _argument: str) -> list[Action]:
        faults = self.config.faults
        if faults.refuse_starttls is not None:
            refusal: list[Action] = [Send.of(faults.refuse_starttls)]
            return refusal + (self._close() if faults.refuse_starttls.code == 421 else [])  # RFC 5321 3.8
        if faults.starttls_in_tls is not None and self.tls is not None:
            return [Send.of(faults.starttls_in_tls)]
        ready, behind_220 = replies.READY_TO_START_TLS, faults.behind_starttls_220
        if faults.answer_behind_starttls is not None and self._reader:
            behind_220 += faults.answer_behind_starttls.wire * self._reader.take().count(b"\n")
        actions: list[Action] = [Send(ready.wire + behind_220, ready), StartTLS()]
        if faults.stall_handshake:
            self._reader.clear()
            self._stalled = True
            self.machine.move(Move.STARTTLS_ACCEPTED)
            return actions[:1]
        if faults.answer_client_hello is not None:
            self._reader.clear()
            self._answer_hello = faults.answer_client_hello
            self.machine.move(Move.STARTTLS_ACCEPTED)
            return actions[:1]
        if self._reader:
            # docs/rules.md §3.3: plaintext behind STARTTLS is never executed inside TLS (CVE-2011-0411).
            behind = self._reader.take()
            self._log(events.InjectionDiscarded(len(behind), behind[:INJECTION_PREVIEW]))
            if self.config.faults.execute_injection:
                self._reader.feed(behind)  # ... but kept after all, and read once TLS is up
        self.machine.move(Move.STARTTLS_ACCEPTED)
        return actions

    def _cmd_mail(self, argument: str) -> list[Action]:
        if self.state is ServerState.GREETING and self.config.faults.mail_without_greeting:
            self._greet("nobody")
        if self.state is ServerState.GREETING:
            return [Send.of(replies.SEND_EHLO_FIRST)]
        if self.state is ServerState.TRANSACTION:
            return [Send.of(Reply(503, "5.5.1", "Nested MAIL command"))]
        path = parse_path(argument, "FROM:")
        if path is None:
            return [Send.of(Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>"))]
        size = path.size()
        if size is not None and size > self.config.params.max_message_size:
            return [Send.of(TEXT_REFUSALS[TextProblem.OVERSIZE])]
        refusal = gate.check_sender(path.address, self.config.params.tls_mandatory_senders, self.facts())
        if refusal is not None:
            return [Send.of(refusal)]
        if self.messages >= self.config.params.max_msgs_per_connection:
            self._log(events.ProtocolViolation("too many messages in this connection"))
            reply = Reply(421, "4.3.2", f"{self.config.hostname} Too many messages in this connection")
            return [Send.of(reply), *self._close()]
        mid = self.hooks.new_mid()
        self._transaction = _Transaction(mid, path.address)
        self.machine.move(Move.MAIL_ACCEPTED)
        self._log(events.MessageStarted(mid))
        self._log(events.SenderAccepted(mid, path.address))
        return [Send.of(self.config.texts.sender_ok)]

    def _cmd_rcpt(self, argument: str) -> list[Action]:
        if self._transaction is None:
            return [Send.of(Reply(503, "5.5.1", "Need MAIL command"))]
        path = parse_path(argument, "TO:")
        if path is None or not path.address:
            return [Send.of(Reply(501, "5.5.4", "Syntax: RCPT TO:<address>"))]
        recipient = path.address
        if len(self._transaction.recipients) >= self.config.params.max_rcpts_per_msg:
            return [Send.of(Reply(452, "4.5.3", "Too many recipients"))]
        if not self.config.accepts_recipient(recipient):
            self._log(events.RecipientRefused(self._transaction.mid, recipient, "RAT"))
            return [Send.of(Reply(550, "5.7.1", "Recipient address rejected: relaying denied"))]
        rid = len(self._transaction.recipients)
        self._transaction.recipients.append(recipient)
        self._log(events.RecipientAccepted(self._transaction.mid, rid, recipient))
        return [Send.of(self.config.texts.recipient_ok)]

    def _cmd_data(self, argument: str) -> list[Action]:
        if argument:
            return [Send.of(Reply(501, "5.5.4", "Syntax: DATA (no parameters)"))]
        if self._transaction is None:
            return [Send.of(Reply(503, "5.5.1", "Need MAIL command"))]
        if not self._transaction.recipients:
            return [Send.of(Reply(554, "5.5.1", "No valid recipients"))]
        self._data = DataReader(
            self._reader, self.config.params.max_message_size, bare_lf_ends_data=self.config.faults.bare_lf_ends_data
        )
        self.machine.move(Move.DATA_ACCEPTED)
        return [_same_reply(354, "End data with <CR><LF>.<CR><LF>")]

    def _cmd_rset(self, _argument: str) -> list[Action]:
        self._transaction = None
        self.machine.move(Move.RESET)
        return [Send.of(self.config.texts.ok)]

    def _cmd_noop(self, _argument: str) -> list[Action]:
        return [Send.of(self.config.texts.ok)]

    def _cmd_quit(self, _argument: str) -> list[Action]:
        return [Send.of(replies.BYE), *self._close()]

    def _cmd_vrfy(self, _argument: str) -> list[Action]:
        return [Send.of(Reply(252, "2.5.2", "Cannot VRFY user, but will accept message"))]

    def _cmd_expn(self, _argument: str) -> list[Action]:
        return [Send.of(Reply(502, "5.5.1", "EXPN not available"))]

    def _cmd_help(self, _argument: str) -> list[Action]:
        return [Send.of(Reply(214, "2.0.0", "EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY STARTTLS"))]

    def _cmd_auth(self, _argument: str) -> list[Action]:
        return [Send.of(Reply(502, "5.5.1", "AUTH not available"))]

    # -- message text

    def _take_data(self, actions: list[Action]) -> bool:
        """Message text up to ``<CRLF>.<CRLF>`` (docs/rules.md §3.9; the reader keeps smuggled dots as text)."""
        assert self._data is not None
        event = self._data.next_event()
        if event is None:
            return False
        if isinstance(event, EndOfData):
            actions.extend(self._end_of_data(event))
        else:
            mid = self._transaction.mid if self._transaction else None
            what = f"malformed end of data kept as message text (MID {mid}; SMTP smuggling?)"
            self._log(events.ProtocolViolation(what))
        return True

    def _end_of_data(self, end: EndOfData) -> list[Action]:
        transaction = self._transaction
        assert transaction is not None
        self._data = None
        self._transaction = None
        if end.problem is not None:
            self.machine.move(Move.TEXT_REFUSED)
            refusal = TEXT_REFUSALS[end.problem]
            self._log(events.MessageRefused(transaction.mid, refusal.text))
            return [Send.of(refusal)]
        message = Message(
            mid=transaction.mid,
            sender=transaction.sender,
            recipients=tuple(transaction.recipients),
            helo=self.greeting or "",
            data=end.text,
            tls=self.tls,
        )
        self._delivering = message
        self.machine.move(Move.TEXT_ACCEPTED)
        return [Deliver(message)]

    def delivered(self, error: str | None = None) -> list[Action]:
        """The spool's answer to ``Deliver``: 250 once the message is durable, else 451; then go on reading."""
        message = self._delivering
        assert message is not None, "delivered() without a pending Deliver"
        self._delivering = None
        if error is not None:
            self._log(events.MessageRefused(message.mid, f"spool error: {error}"))
            reply = Reply(451, "4.3.0", "Local error in processing, try again later")
        else:
            self.messages += 1
            self._log(events.MessageReady(message.mid, len(message.data)))
            reply = Reply(250, "2.0.0", f"Ok: queued as {message.mid}")
        if self.closed:
            return []
        self.machine.move(Move.DELIVERED)
        return [Send.of(reply), *self.receive(b"")]

    def _close(self, abort: bool = False) -> list[Action]:
        if not self.closed:
            self.machine.move(Move.CLOSE)
        return [Close(abort=abort)]

    def shutdown(self) -> list[Action]:
        """The server is stopping (RFC 5321 3.8): ``421 4.3.2 <host> Service shutting down`` and close.

        A message being spooled keeps its turn: this returns nothing until ``delivered`` has sent its 250 (the
        listener asks again then). A TLS handshake in progress is aborted: there is no channel to answer on.
        """
        if self.closed or self.state is ServerState.DELIVERING:
            return []
        if self.greeting is not None and self.greeting in self.config.faults.ignore_shutdown_from:
            return []
        if self.tls_pending:
            return self._close(abort=True)
        if self._transaction is not None:
            self._log(events.MessageRefused(self._transaction.mid, "server shutting down"))
        self._transaction = None
        self._data = None
        reply = replies.SHUTTING_DOWN
        text = f"{self.config.hostname} {reply.text}"
        return [Send.of(Reply(reply.code, reply.enhanced, text)), *self._close()]

    # -- what the listener's deadlines need (lab.policy.deadlines)

    @property
    def in_data(self) -> bool:
        """Between the 354 and the final dot: the listener bounds this phase as a whole."""
        return self.state is ServerState.DATA

    def deadline_expired(self, what: str, reply: Reply) -> list[Action]:
        """A deadline passed: log which, send ``reply`` (a 421, RFC 5321 4.5.3.2) and close."""
        if self.closed:
            return []
        self._log(events.ProtocolViolation(what))
        return [Send.of(reply), *self._close()]
