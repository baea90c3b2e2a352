"""A receiving MTA with a configurable STARTTLS misbehaviour, to test the CLIENT side.

It is the lab's server session (``lab.smtp.session.ServerSession``) with another MTA's reply texts and one of
the fault policies of ``lab.smtp.faults``: its STARTTLS can be absent (a server without TLS), refused with 454,
followed by garbage, followed by an injected response, doomed to a failed handshake, refused with 421 (and the
connection closed) or 554, or left to stall after the 220. The receivers that judge senders
(``lab.sender.receivers``) are remote MTAs too, with the certificate and TLS settings of their case.
``injection_vulnerable`` makes it execute plaintext sent behind STARTTLS inside TLS (CVE-2011-0411), so the
client's ``injection_executed`` detection has something to detect. The protocol here is a thin shell: it
carries out the session's actions and keeps a record of each connection for the tests; it parses nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol as TypingProtocol
from typing import cast

from OpenSSL import SSL
from twisted.internet.interfaces import IAddress, IDelayedCall, IHandshakeListener, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from lab.errors import BadInput
from lab.policy.modes import Behaviour, TLSMode
from lab.policy.params import EffectiveParams
from lab.smtp import faults
from lab.smtp.core.events import LogEvent, Reply
from lab.smtp.faults import GARBAGE, HANDSHAKE_FAILURE_ALERT, NO_FAULTS, FaultPolicy
from lab.smtp.session import Action, Close, Deliver, Send, ServerSession, SessionConfig, StartTLS, Texts
from lab.tls.certs import demo_certificate
from lab.tls.tlsctx import ServerTLS, tls_error_reason, tls_facts

__all__ = ["GARBAGE", "HANDSHAKE_FAILURE_ALERT", "MODES", "RemoteMTAFactory", "RemoteMTAProtocol"]

#: Each STARTTLS mode: the fault policy it runs with ("absent": a server without STARTTLS, see ``TLS_MODES``).
FAULTS: dict[str, FaultPolicy] = {
    "ok": NO_FAULTS,
    "absent": NO_FAULTS,
    "454": faults.STARTTLS_454,
    "garbage-after-220": faults.GARBAGE_AFTER_220,
    "response-injection": faults.RESPONSE_INJECTION,
    "handshake-fail": faults.HANDSHAKE_FAIL,
    "421": faults.STARTTLS_421,
    "554": faults.STARTTLS_554,
    "stall-handshake": faults.STALL_HANDSHAKE,
}
MODES = tuple(FAULTS)

#: The remote MTA's replies, as the lab has always written them (transcripts stay comparable across versions).
TEXTS = Texts(
    ehlo_first="{hostname}",
    extensions=("PIPELINING", "SIZE {size}", "8BITMIME"),
    last_extensions=(),
    sender_ok=Reply(250, "2.1.0", "Ok"),
    recipient_ok=Reply(250, "2.1.5", "Ok"),
    ok=Reply(250, "2.0.0", "Ok"),
)
PARAMS = EffectiveParams(
    banner_text="ESMTP smtplab remote MTA",
    max_message_size=10240000,
    max_msgs_per_connection=1_000_000,
    tls=TLSMode.PREFERRED,
)
IDLE_TIMEOUT = Reply(421, "4.4.2", "Idle timeout")


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
    """``starttls``: one of ``MODES`` (``ok``, ``absent``, ``454``, ``garbage-after-220``, ``response-injection``,
    ``handshake-fail``, ``421``, ``554``, ``stall-handshake``). Without ``tls_server`` the demo certificate is used."""

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
        if starttls not in FAULTS:
            raise BadInput(f"{starttls!r} is not one of {', '.join(MODES)}", field="starttls")
        self.hostname = hostname
        self.starttls = starttls
        self._tls_server = tls_server
        self.clock = clock
        self.faults = replace(FAULTS[starttls], execute_injection=injection_vulnerable)
        self.params = replace(PARAMS, tls=TLSMode.NO if starttls == "absent" else TLSMode.PREFERRED)
        self.idle_timeout = idle_timeout
        self.sessions: list[SessionLog] = []
        self.messages: list[ReceivedMessage] = []

    @property
    def tls_server(self) -> ServerTLS:
        if self._tls_server is None:
            self._tls_server = ServerTLS(demo_certificate())
        return self._tls_server

    def buildProtocol(self, addr: IAddress | None) -> RemoteMTAProtocol:
        protocol = RemoteMTAProtocol(self)
        protocol.factory = self
        return protocol


class _Transport(TypingProtocol):
    """What this protocol asks of its transport (docs/architecture.md, "Transport contract")."""

    def write(self, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def registerProducer(self, producer: object, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...
    def startTLS(self, creator: object) -> None: ...
    def getHandle(self) -> SSL.Connection: ...


@implementer(IHandshakeListener, IPushProducer)
class RemoteMTAProtocol(Protocol):
    """One connection: bytes to the session, the session's actions to the transport."""

    def __init__(self, factory: RemoteMTAFactory) -> None:
        self.owner = factory
        self.log = SessionLog()
        factory.sessions.append(self.log)
        config = SessionConfig(
            hostname=factory.hostname,
            behaviour=Behaviour.ACCEPT,
            params=factory.params,
            faults=factory.faults,
            texts=TEXTS,
            on_command=self._command,
        )
        self.session = ServerSession(config, self)
        self._tls_pending = False
        self._idle: IDelayedCall | None = None

    @property
    def wire(self) -> _Transport:
        return cast(_Transport, self.transport)

    # -- SessionHooks

    def new_mid(self) -> int:
        return len(self.owner.messages) + 1

    def log_event(self, event: LogEvent) -> None:
        """This MTA keeps no mail log."""

    def _command(self, line: str) -> None:
        self.log.commands.append((self.log.tls, line))

    # -- the connection

    def connectionMade(self) -> None:
        # a push producer: paused (its transport's output full) it stops reading, so a client that pipelines
        # and never reads cannot grow this MTA
        self.wire.registerProducer(self, True)
        if self.owner.clock is not None:
            self._idle = self.owner.clock.callLater(self.owner.idle_timeout, self._idle_expired)
        self._apply(self.session.start())

    def _idle_expired(self) -> None:
        self._idle = None
        self._apply(self.session.deadline_expired("idle timeout", IDLE_TIMEOUT))

    def dataReceived(self, data: bytes) -> None:
        if self._idle is not None:
            self._idle.reset(self.owner.idle_timeout)
        self._apply(self.session.receive(data))

    def handshakeCompleted(self) -> None:
        self.log.tls = True
        facts = tls_facts(self.wire.getHandle())
        self.log.tls_version, self.log.client_cert_subject = facts.version, facts.peer_subject
        self._apply(self.session.tls_started(facts))

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]  # Protocol's default
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        self.log.closed = True
        if self._tls_pending and not self.log.tls and reason is not None:
            value = reason.value
            self.log.tls_error = tls_error_reason(value) if isinstance(value, SSL.Error) else type(value).__name__
        self.session.connection_lost()

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self.wire.write(action.data)
            elif isinstance(action, StartTLS):
                self._tls_pending = True
                self.wire.startTLS(self.owner.tls_server)
            elif isinstance(action, Deliver):
                message = action.message
                received = ReceivedMessage(
                    message.sender, list(message.recipients), message.data, message.tls is not None
                )
                self.owner.messages.append(received)
                self._apply(self.session.delivered())
            elif isinstance(action, Close):
                self.wire.unregisterProducer()  # a registered producer would hold the close open
                if action.abort:
                    self.wire.abortConnection()
                else:
                    self.wire.loseConnection()

    # -- IPushProducer

    def pauseProducing(self) -> None:
        if self._tls_pending and not self.log.tls:
            return  # the TLS layer holds writes until its handshake is done, and that needs reading to go on
        self.wire.pauseProducing()

    def resumeProducing(self) -> None:
        self.wire.resumeProducing()

    def stopProducing(self) -> None:
        """``connectionLost`` follows."""
