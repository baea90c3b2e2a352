"""A small receiving MTA with a configurable STARTTLS misbehaviour, to test the CLIENT side.

It is deliberately not the appliance listener (``lab.smtp.session`` + ``listener``): it knows just enough SMTP
to take a message, and its STARTTLS can be absent, refused with 454, followed by garbage, followed by an injected
response, or doomed to a failed handshake. ``injection_vulnerable`` makes it execute plaintext sent behind
STARTTLS inside TLS (CVE-2011-0411), so the client's ``injection_executed`` detection has something to detect.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from OpenSSL import SSL
from twisted.internet.interfaces import IHandshakeListener, IReactorTime
from twisted.internet.protocol import ServerFactory
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from lab.errors import BadInput
from lab.tls.certs import demo_certificate
from lab.tls.tlsctx import ServerTLS, tls_error_reason, tls_facts

MODES = ("ok", "absent", "454", "garbage-after-220", "response-injection", "handshake-fail")
#: A fatal TLS alert, handshake_failure(40): what a server with nothing in common with the ClientHello sends.
HANDSHAKE_FAILURE_ALERT = b"\x15\x03\x03\x00\x02\x02\x28"
GARBAGE = b"500 this is not a TLS ServerHello\r\n"


@dataclass
class ReceivedMessage:
    mail_from: str
    rcpt_to: list[str]
    data: bytes
    tls: bool


@dataclass
class SessionLog:
    """What one connection did, for tests to assert on."""

    commands: list[tuple[bool, str]] = field(default_factory=list)  # (inside TLS?, line)
    tls: bool = False
    tls_version: str | None = None
    client_cert_subject: str | None = None  # the certificate the client presented, if any
    tls_error: str | None = None
    closed: bool = False


class RemoteMTAFactory(ServerFactory):
    """``starttls``: ``ok`` | ``absent`` | ``454`` | ``garbage-after-220`` | ``response-injection`` |
    ``handshake-fail``. Without ``tls_server`` the demo certificate is used."""

    def __init__(
        self,
        hostname: str,
        *,
        starttls: str = "ok",
        tls_server: ServerTLS | None = None,
        clock: IReactorTime | None = None,
        injection_vulnerable: bool = False,
        idle_timeout: float = 300.0,
    ) -> None:
        if starttls not in MODES:
            raise BadInput(f"{starttls!r} is not one of {', '.join(MODES)}", field="starttls")
        self.hostname = hostname
        self.starttls = starttls
        self._tls_server = tls_server
        self.clock = clock
        self.injection_vulnerable = injection_vulnerable
        self.idle_timeout = idle_timeout
        self.sessions: list[SessionLog] = []
        self.messages: list[ReceivedMessage] = []

    @property
    def tls_server(self) -> ServerTLS:
        if self._tls_server is None:
            self._tls_server = ServerTLS(demo_certificate())
        return self._tls_server

    def buildProtocol(self, addr: Any) -> RemoteMTAProtocol:
        protocol = RemoteMTAProtocol(self)
        protocol.factory = self
        return protocol


@implementer(IHandshakeListener)
class RemoteMTAProtocol(LineReceiver, TimeoutMixin):
    delimiter = b"\n"
    MAX_LENGTH = 4096

    def __init__(self, factory: RemoteMTAFactory) -> None:
        self.owner = factory
        self.log = SessionLog()
        factory.sessions.append(self.log)
        self.tls = False
        self.tls_pending = False
        self.after_220: bytes | None = None  # garbage-after-220 / handshake-fail: what to answer the ClientHello
        self._reset()
        if factory.clock is not None:
            self.callLater = factory.clock.callLater

    def _reset(self) -> None:
        self.helo: str | None = None
        self.mail_from: str | None = None
        self.rcpt_to: list[str] = []
        self.data: list[bytes] | None = None

    def reply(self, text: str) -> None:
        self.transport.write(text.encode("ascii") + b"\r\n")

    def connectionMade(self) -> None:
        # LineReceiver is a push producer: paused (its transport's output full) it stops reading, so a client
        # that pipelines and never reads cannot grow this MTA
        self.transport.registerProducer(self, True)
        if self.owner.clock is not None:
            self.setTimeout(self.owner.idle_timeout)
        self.reply(f"220 {self.owner.hostname} ESMTP smtplab remote MTA")

    def timeoutConnection(self) -> None:
        self.reply("421 4.4.2 Idle timeout")
        self._close()

    def dataReceived(self, data: bytes) -> None:
        if self.owner.clock is not None:
            self.resetTimeout()
        if self.after_220 is not None and data:  # (resumeProducing re-enters with b"")
            self.transport.write(self.after_220)  # the ClientHello is answered with something that is not TLS
            self.after_220 = None
            self._close()
            return
        super().dataReceived(data)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.reply("500 5.5.2 Line too long")
        self._close()

    def lineReceived(self, raw: bytes) -> None:
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if self.data is not None:
            return self._data_line(line)
        text = line.decode("utf-8", "replace")
        self.log.commands.append((self.tls, text))
        verb, _, argument = text.partition(" ")
        handler = getattr(self, f"smtp_{verb.upper()}", None)
        if handler is None:
            return self.reply("500 5.5.1 Command unrecognized")
        handler(argument.strip())

    def _data_line(self, line: bytes) -> None:
        assert self.data is not None
        if line == b".":
            message = ReceivedMessage(self.mail_from or "", list(self.rcpt_to), b"".join(self.data), self.tls)
            self.owner.messages.append(message)
            self._reset_envelope()
            self.reply(f"250 2.0.0 Ok: queued as {len(self.owner.messages)}")
            return
        self.data.append((line[1:] if line.startswith(b".") else line) + b"\r\n")

    def _reset_envelope(self) -> None:
        self.mail_from, self.rcpt_to, self.data = None, [], None

    # -- commands

    def smtp_EHLO(self, argument: str) -> None:
        self.helo = argument
        self._reset_envelope()
        lines = [self.owner.hostname, "PIPELINING", "SIZE 10240000", "8BITMIME"]
        if self.owner.starttls != "absent" and not self.tls:
            lines.append("STARTTLS")
        for i, line in enumerate(lines):
            self.reply(f"250{'-' if i < len(lines) - 1 else ' '}{line}")

    def smtp_HELO(self, argument: str) -> None:
        self.helo = argument
        self._reset_envelope()
        self.reply(f"250 {self.owner.hostname}")

    def smtp_STARTTLS(self, argument: str) -> None:
        mode = self.owner.starttls
        if mode == "absent":
            return self.reply("502 5.5.1 STARTTLS not implemented")
        if argument:
            return self.reply("501 5.5.4 Syntax error (no parameters allowed)")
        if self.tls:
            return self.reply("503 5.5.1 TLS already active")
        if mode == "454":
            return self.reply("454 4.7.0 TLS not available due to local problem")
        if mode == "response-injection":
            self.transport.write(b"220 2.0.0 Ready to start TLS\r\n250 2.0.0 injected\r\n")
        else:
            self.reply("220 2.0.0 Ready to start TLS")
        if mode in ("garbage-after-220", "handshake-fail"):
            self.clearLineBuffer()
            self.after_220 = GARBAGE if mode == "garbage-after-220" else HANDSHAKE_FAILURE_ALERT
            return
        if not self.owner.injection_vulnerable:
            self.clearLineBuffer()  # RFC 3207 / CVE-2011-0411: plaintext behind STARTTLS is never executed
        self._reset()
        self.tls_pending = True
        self.transport.startTLS(self.owner.tls_server)

    def handshakeCompleted(self) -> None:
        self.tls = self.log.tls = True
        facts = tls_facts(self.transport.getHandle())
        self.log.tls_version, self.log.client_cert_subject = facts.version, facts.peer_subject

    def smtp_MAIL(self, argument: str) -> None:
        if self.helo is None:
            return self.reply("503 5.5.1 Send EHLO first")
        if not argument.upper().startswith("FROM:"):
            return self.reply("501 5.5.4 Syntax: MAIL FROM:<address>")
        self.mail_from = argument[5:].strip().split(" ")[0].strip("<>")
        self.reply("250 2.1.0 Ok")

    def smtp_RCPT(self, argument: str) -> None:
        if self.mail_from is None:
            return self.reply("503 5.5.1 Need MAIL first")
        if not argument.upper().startswith("TO:"):
            return self.reply("501 5.5.4 Syntax: RCPT TO:<address>")
        self.rcpt_to.append(argument[3:].strip().strip("<>"))
        self.reply("250 2.1.5 Ok")

    def smtp_DATA(self, argument: str) -> None:
        if not self.rcpt_to:
            return self.reply("503 5.5.1 Need RCPT first")
        self.data = []
        self.reply("354 End data with <CR><LF>.<CR><LF>")

    def smtp_RSET(self, argument: str) -> None:
        self._reset_envelope()
        self.reply("250 2.0.0 Ok")

    def smtp_NOOP(self, argument: str) -> None:
        self.reply("250 2.0.0 Ok")

    def smtp_QUIT(self, argument: str) -> None:
        self.reply("221 2.0.0 Bye")
        self._close()

    def pauseProducing(self) -> None:
        if self.tls_pending and not self.tls:
            return  # the TLS layer holds writes until its handshake is done, and that needs reading to go on
        super().pauseProducing()

    def _close(self) -> None:
        self.transport.unregisterProducer()  # a registered producer would hold the close open
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.setTimeout(None)
        self.log.closed = True
        if self.tls_pending and not self.tls and reason is not None:
            value = reason.value
            self.log.tls_error = tls_error_reason(value) if isinstance(value, SSL.Error) else type(value).__name__
