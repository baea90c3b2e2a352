"""The appliance listener on Twisted: a thin shell that feeds bytes to ``ServerSession``.

The same protocol runs over real TCP (``smtplab serve``), the in-memory network and the loopback network;
only the transport differs (docs/architecture.md, "Transport contract"). This module decides nothing about
SMTP: it resolves the peer through the HAT, counts connections, and carries out the session's actions.

Two things bound what one connection can cost, whatever the client does:

- deadlines (``lab.policy.deadlines``): one timer per connection, armed for the earliest deadline of its phase;
  on expiry a 421 and a graceful close, or an abort mid-handshake or when a graceful close does not complete
  within the close grace. The slot (Max Concurrency, per-IP count) is freed when the connection is gone.
- backpressure: the protocol is a streaming producer of its transport. While the transport's unsent output is
  over its buffer size (or a message is being spooled) the connection is not read, and the session is fed at
  most ``FEED_SLICE`` bytes at a time, so a client that pipelines and never reads cannot grow the server.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from typing import Protocol as TypingProtocol

from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from lab.appliance.maillog import MailLog
from lab.appliance.model import Appliance, Interface, Listener, Resolution
from lab.appliance.spool import Outcome, Spool, SpoolError, received_header
from lab.appliance.spool_process import SpoolProcess
from lab.net.transport import SessionTransport
from lab.policy import admission
from lab.policy.deadlines import Expiry, Phase, Watch
from lab.policy.hat import Peer
from lab.policy.modes import Behaviour, ClientCert
from lab.smtp.core import events
from lab.smtp.faults import NO_FAULTS, FaultPolicy
from lab.smtp.session import Action, Close, Deliver, Message, Send, ServerSession, SessionConfig, StartTLS
from lab.tls.certs import CertKey, LabCA, demo_certificate, load_pem
from lab.tls.tlsctx import ServerTLS, tls_error_reason, tls_facts

#: After the 421 of a clean stop, how long a TLS connection waits for the client's close_notify before it is
#: aborted (a TLS close waits for the peer's; one that does not read would otherwise hold the stop up).
TLS_CLOSE_WAIT = 1.0

#: At most this much input is given to the session at once: bounds the replies one read can produce.
FEED_SLICE = 4096

#: How many peers' HAT resolutions a listener remembers (then it starts afresh): bounds the memory they take.
RESOLUTIONS_KEPT = 4096


class OutboundSink(TypingProtocol):
    """The delivery queue as a listener sees it (``lab.outbound.engine.DeliveryEngine``)."""

    def enqueue(self, data: bytes, *, mid: int, sender: str, recipients: Sequence[tuple[int, str]]) -> Sequence[Any]:
        """Store durably (SpoolError if not) and deliver later."""


#: Reverse DNS as the appliance sees it: ip -> (name or None, verified?)
ReverseDNS = Callable[[str], tuple[str | None, bool]]


def no_reverse_dns(_ip: str) -> tuple[str | None, bool]:
    return None, False


class ApplianceRuntime:
    """What all listeners of one appliance share: mail log, spool, certificates, clock, reverse DNS."""

    def __init__(
        self,
        appliance: Appliance,
        *,
        clock: IReactorTime,
        maillog: MailLog,
        spool: Spool,
        state_dir: Path,
        reverse_dns: ReverseDNS = no_reverse_dns,
        keylog: Callable[[bytes], None] | None = None,
        committer: SpoolProcess | None = None,
        faults: FaultPolicy = NO_FAULTS,
        tls_cache: dict[Any, ServerTLS] | None = None,
    ) -> None:
        self.appliance = appliance
        self.clock = clock
        self.maillog = maillog
        self.spool = spool
        self.state_dir = state_dir
        self.reverse_dns = reverse_dns
        self.keylog = keylog
        self.committer = committer  # real reactor: spool writes off the reactor thread, in batches
        self.faults = faults  # tests break the sessions on purpose (lab.smtp.faults) to prove verdicts fail
        self._tls: dict[Any, ServerTLS] = {} if tls_cache is None else tls_cache  # shared across runs by the lab
        self._ca: LabCA | None = None
        self.outbound: OutboundSink | None = None  # lab.outbound.engine.DeliveryEngine: where RELAY mail goes

    @property
    def ca(self) -> LabCA:
        if self._ca is None:
            self._ca = LabCA(self.state_dir)
        return self._ca

    def certificate(self, listener: Listener) -> CertKey:
        """The certificate a listener presents; none assigned means the insecure demo certificate."""
        return self.certificate_named(listener.certificate)

    def certificate_named(self, name: str | None) -> CertKey:
        """One of the appliance's certificates by name (None: the demo certificate)."""
        if name is None:
            return demo_certificate()
        cert = self.appliance.certificates[name]
        if cert.kind == "lab":
            return self.ca.issue(cert.name, list(cert.hostnames) or [self.appliance.hostname])
        if cert.kind == "pem":
            assert cert.cert_file and cert.key_file
            return load_pem(cert.cert_file, cert.key_file, cert.name)
        return demo_certificate()

    def server_tls(self, listener: Listener) -> ServerTLS:
        """One TLS context per listener configuration, built on first use."""
        verify = any(p.effective(listener.defaults).verify_client for p in listener.policies.values())
        key = (listener.name, listener.certificate, listener.tls, verify)
        if key not in self._tls:
            self._tls[key] = ServerTLS(
                self.certificate(listener),
                min_version=listener.tls.min_version,
                max_version=listener.tls.max_version,
                ciphers=listener.tls.ciphers,
                request_client_cert=verify,
                client_ca_pems=(self.ca.ca_pem,) if verify else (),
                keylog=self.keylog,
            )
        return self._tls[key]

    def factory(self, listener: Listener) -> ListenerFactory:
        return ListenerFactory(self, listener, self.appliance.interfaces[listener.interface])


class ListenerFactory(ServerFactory):
    """One per listener: counts connections for Max Concurrency and per-IP limits."""

    def __init__(self, runtime: ApplianceRuntime, listener: Listener, interface: Interface) -> None:
        self.runtime = runtime
        self.listener = listener
        self.interface = interface
        self.active = 0
        self.per_ip: Counter[str] = Counter()
        self.live: set[ListenerProtocol] = set()  # open connections, for a clean stop (``shutdown``)
        self._lingering: dict[ListenerProtocol, IDelayedCall] = {}  # told 421 inside TLS: abort timers
        self._resolved: dict[tuple[str, str | None], Resolution] = {}  # the HAT's answers, per peer
        self._server_tls: ServerTLS | None = None

    def server_tls(self) -> ServerTLS:
        """The listener's TLS context (``ApplianceRuntime.server_tls``), looked up once rather than per STARTTLS."""
        if self._server_tls is None:
            self._server_tls = self.runtime.server_tls(self.listener)
        return self._server_tls

    def resolve(self, peer_ip: str, peer_name: str | None) -> Resolution:
        """The listener's HAT resolution for a peer (pure: the same peer always gets the same), remembered."""
        key = (peer_ip, peer_name)
        resolution = self._resolved.get(key)
        if resolution is None:
            if len(self._resolved) >= RESOLUTIONS_KEPT:
                self._resolved.clear()
            resolution = self._resolved[key] = self.listener.resolve(Peer.of(peer_ip, peer_name))
        return resolution

    def buildProtocol(self, addr: Any) -> ListenerProtocol:
        protocol = ListenerProtocol(self)
        protocol.factory = self
        self.live.add(protocol)
        return protocol

    # -- stopping cleanly (smtplab serve on SIGTERM/SIGINT)

    _stopped: Deferred[None] | None = None

    def shutdown(self, grace: float) -> Deferred[None]:
        """421 and close every open session (``ListenerProtocol.shutdown``); fires once all are closed.

        Call once the port has stopped listening. A session whose message is being spooled gets its 250
        first; whatever is still open ``grace`` seconds later is aborted.
        """
        stopped: Deferred[None] = Deferred()
        self._stopped = stopped
        timer = self.runtime.clock.callLater(grace, self._abort_open)

        def cancel_timer(result: object) -> object:
            if timer.active():
                timer.cancel()
            return result

        stopped.addBoth(cancel_timer)
        for protocol in list(self.live):
            protocol.shutdown()
        self._check_stopped()
        return stopped

    def forget(self, protocol: ListenerProtocol) -> None:
        """A connection is closed (its last log line written)."""
        self.live.discard(protocol)
        timer = self._lingering.pop(protocol, None)
        if timer is not None and timer.active():
            timer.cancel()
        self._check_stopped()

    def linger(self, protocol: ListenerProtocol, seconds: float) -> None:
        """Abort ``protocol``'s connection if it is still open ``seconds`` from now."""
        self._lingering[protocol] = self.runtime.clock.callLater(seconds, protocol.abort)

    def _check_stopped(self) -> None:
        if self._stopped is not None and not self.live and not self._stopped.called:
            self._stopped.callback(None)

    def _abort_open(self) -> None:
        for protocol in list(self.live):
            protocol.abort()


@implementer(IHandshakeListener, IPushProducer)
class ListenerProtocol(Protocol):
    """One SMTP connection to a listener."""

    transport: SessionTransport  # what every carrier connects a protocol to; set before connectionMade

    def __init__(self, factory: ListenerFactory) -> None:
        self.owner = factory
        self.runtime = factory.runtime
        self.listener = factory.listener
        self.log = factory.runtime.maillog
        self.clock = factory.runtime.clock
        self.session: ServerSession | None = None
        self.icid = 0
        self.peer_ip = ""
        self.peer_name: str | None = None
        self._counted_ip = False
        self._tls_pending = False
        self._tls_done = False
        # deadlines
        self.watch: Watch | None = None
        self._timer: IDelayedCall | None = None
        # flow control
        self._held = b""  # read but not yet given to the session
        self._output_full = False  # the transport asked us to pause: its unsent output is over its bound
        self._delivering = False
        self._reading = True
        self._feeding = False
        self._closing = False
        self._aborted = False
        self._lost = False
        self.behaviour: Behaviour | None = None

    # -- connection

    def connectionMade(self) -> None:
        self.owner.active += 1
        self.watch = Watch.start(self.listener.timeouts, self.clock.seconds())
        self.transport.registerProducer(self, True)
        self.icid = self.log.next_icid()
        self.peer_ip = self.transport.getPeer().host
        name, verified = self.runtime.reverse_dns(self.peer_ip)
        self.peer_name = name if verified else None
        self.log.new_connection(
            self.icid, self.owner.interface.name, self.owner.interface.address, self.peer_ip, name, verified
        )
        refusal = admission.over_max_concurrency(self.owner.active, self.listener.max_concurrency)
        if refusal is not None:
            self._refuse(refusal)
            return
        resolution = self.owner.resolve(self.peer_ip, self.peer_name)
        self.log.policy(
            self.icid, resolution.policy.behaviour.value.upper(), resolution.match.group, resolution.match.member
        )
        self.owner.per_ip[self.peer_ip] += 1
        self._counted_ip = True
        refusal = admission.over_per_ip_limit(self.owner.per_ip[self.peer_ip], resolution.params.max_concurrency_per_ip)
        if refusal is not None:
            self._refuse(refusal)
            return
        behaviour = self.behaviour = resolution.policy.behaviour
        config = SessionConfig(
            hostname=self.runtime.appliance.hostname,
            behaviour=behaviour,
            params=resolution.params,
            accepts_recipient=lambda address: self.listener.accepts_recipient(address, behaviour),
            faults=self.runtime.faults,
        )
        self.session = ServerSession(config, self)
        self._apply(self.session.start())
        self._arm()

    def _refuse(self, refusal: admission.Refusal) -> None:
        self.log.refused(self.icid, refusal.reason)
        self._apply([Send.of(refusal.reply), Close()])

    def dataReceived(self, data: bytes) -> None:
        if self.session is None or self._closing:
            return
        assert self.watch is not None
        self.watch = self.watch.received(self.clock.seconds(), completes_record=b"\n" in data)
        self._held += data
        if self._delivering:
            self._update_reading()  # the session waits for the spool: hold at most a slice of what follows
        self._feed()

    def handshakeCompleted(self) -> None:
        self._tls_done = True
        self._tls_pending = False
        if self.session is None or self._closing:
            return
        connection = self.transport.getHandle()
        assert connection is not None  # a handshake completed, so startTLS made one
        facts = tls_facts(connection)
        state = ClientCert.NONE
        if self.session.config.params.verify_client:
            state = self.owner.server_tls().client_cert_state(connection)
        self._apply(self.session.tls_started(facts, state))
        self._feed()  # application data that came with the end of the handshake

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._lost = True
        self._cancel_timer()
        self.owner.active -= 1
        if self._counted_ip:
            self.owner.per_ip[self.peer_ip] -= 1
            if self.owner.per_ip[self.peer_ip] <= 0:
                del self.owner.per_ip[self.peer_ip]
        session = self.session
        if session is not None:
            if self._tls_pending and not self._tls_done:
                session.tls_failed(_reason_text(reason))
            session.connection_lost()
        self.log.close(self.icid, "peer" if session is None or not session.closed else "listener")
        # release what this connection held: the session (and its buffers), held input, the clock's timer
        self.session = None
        self._held = b""
        self.watch = None
        self.owner.forget(self)

    # -- flow control: IPushProducer, driven by the transport

    def pauseProducing(self) -> None:
        """The transport's unsent output is over its bound: stop reading until it drains."""
        if self._tls_pending and not self._tls_done:
            return  # the TLS layer holds writes until its handshake is done, and that needs reading to go on
        self._output_full = True
        self._update_reading()

    def resumeProducing(self) -> None:
        self._output_full = False
        self._update_reading()
        self._feed()

    def stopProducing(self) -> None:
        """The transport is going away; ``connectionLost`` follows and releases everything."""

    def _update_reading(self) -> None:
        """Read from the transport only while output can drain, and while a message is being spooled only until
        a slice of input is held (most clients send nothing until the 250: no pause and resume per message)."""
        held_enough = self._delivering and len(self._held) >= FEED_SLICE
        want = not (self._output_full or held_enough or self._closing or self._lost)
        if want == self._reading:
            return
        self._reading = want
        if self._closing or self._lost:
            return  # closing stops reading by itself
        if want:
            self.transport.resumeProducing()
        else:
            self.transport.pauseProducing()

    def _feed(self) -> None:
        """Give held input to the session, a slice at a time, while it may take more."""
        if self._feeding:
            return
        self._feeding = True
        try:
            while (
                self._held and self._reading and not self._delivering and self.session is not None and not self._closing
            ):
                piece, self._held = self._held[:FEED_SLICE], self._held[FEED_SLICE:]
                self._apply(self.session.receive(piece))
        finally:
            self._feeding = False
        self._arm()

    # -- deadlines

    def _phase(self) -> Phase:
        if self._closing:
            return Phase.CLOSING
        if self._tls_pending and not self._tls_done:
            return Phase.HANDSHAKE
        if self._delivering:
            return Phase.DELIVERY
        if self.session is not None and self.session.in_data:
            return Phase.DATA
        return Phase.COMMAND

    def _arm(self) -> None:
        """Keep one timer armed no later than the next expiry (a later one is re-armed when it fires)."""
        if self.watch is None or self._aborted or self._lost:
            return
        phase = self._phase()
        if phase is self.watch.phase and self._timer is not None and self._timer.active():
            return  # in one phase deadlines only move later (input restarts them): the armed timer is early enough
        now = self.clock.seconds()
        self.watch = self.watch.enter(phase, now)
        at = self.watch.expiry().at
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= at:
                return
            self._timer.cancel()
        self._timer = self.clock.callLater(max(0.0, at - now), self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self.watch is None or self._aborted or self._lost:
            return
        self.watch = self.watch.enter(self._phase(), self.clock.seconds())
        expiry = self.watch.due(self.clock.seconds())
        if expiry is not None:
            self._expire(expiry)
        self._arm()

    def _expire(self, expiry: Expiry) -> None:
        """421 and a graceful close where one can complete; else log and abort."""
        if expiry.graceful and self.session is not None and not self.session.closed:
            self._apply(self.session.deadline_expired(expiry.what, expiry.reply))
            if self._closing:
                return
        self.log.protocol_error(self.icid, f"{expiry.what}, connection aborted")
        self._close(abort=True)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    # -- carrying out the session's actions

    def _apply(self, actions: list[Action]) -> None:
        """Carry out the session's actions; the replies that follow one another go out in one write (under TLS,
        one record)."""
        replies: list[bytes] = []
        for action in actions:
            if isinstance(action, Send):
                replies.append(action.data)
                continue
            if replies:
                self.transport.write(b"".join(replies))
                replies.clear()
            if isinstance(action, StartTLS):
                server_tls = self.owner.server_tls()
                if server_tls.certkey.insecure_demo:
                    self.log.demo_certificate(self.icid)
                self._tls_pending = True
                self.transport.startTLS(server_tls)
            elif isinstance(action, Deliver):
                self._delivering = True
                self._update_reading()
                self._deliver(action.message)
            elif isinstance(action, Close):
                self._close(action.abort)
        if replies:
            self.transport.write(b"".join(replies))

    def _close(self, abort: bool) -> None:
        """Graceful: the close deadline (close grace) bounds it; abort: at once. Input is no longer read."""
        self._held = b""
        if not self._closing:
            self._closing = True
            self.transport.unregisterProducer()  # a registered producer would hold a graceful close open
        if abort and not self._aborted:
            self._aborted = True
            self._cancel_timer()
            self.transport.abortConnection()
        elif not abort:
            self.transport.loseConnection()
        self._arm()

    # -- delivery: the 250 goes out only once the message is durable

    def _deliver(self, message: Message) -> None:
        header = received_header(
            from_host=self.peer_name or self.peer_ip,
            from_addr=self.peer_ip,
            helo=message.helo,
            by_host=self.runtime.appliance.hostname,
            tls=message.tls,
            mid=message.mid,
            recipient=message.recipients[0] if len(message.recipients) == 1 else None,
            when=self.runtime.clock.seconds(),
        )
        data = header + message.data
        if self.behaviour is Behaviour.RELAY and self.runtime.outbound is not None:
            relayed = self._relay(message, data)
            if relayed is not None:
                self._delivered(message, relayed)
                return
        committer = self.runtime.committer
        try:
            maildir = self.runtime.spool.for_listener(self.listener.name)
            if committer is not None:
                committer.submit(maildir, data, lambda outcome: self._delivered(message, outcome))
                return
            outcome: Outcome = maildir.deliver(data)
        except Exception as exc:  # the spool's own error or any OSError: never a crash, always a 451
            outcome = SpoolError(str(exc) or type(exc).__name__)
        self._delivered(message, outcome)

    def _relay(self, message: Message, data: bytes) -> Outcome | None:
        """RELAY: recipients outside the appliance's own domains go into the delivery queue, durably, before the
        250 (docs/outbound.md). None: every recipient is local, so the message is spooled as usual."""
        assert self.runtime.outbound is not None
        appliance = self.runtime.appliance
        remote = [
            (rid, address)
            for rid, address in enumerate(message.recipients)
            if appliance.local_listener(address.strip("<>").rpartition("@")[2]) is None
        ]
        if not remote:
            return None
        if len(remote) < len(message.recipients):  # some are local: they go to the spool as well, first
            try:
                self.runtime.spool.for_listener(self.listener.name).deliver(data)
            except Exception as exc:
                return SpoolError(str(exc) or type(exc).__name__)
        try:
            items = self.runtime.outbound.enqueue(data, mid=message.mid, sender=message.sender, recipients=remote)
        except Exception as exc:  # the queue's SpoolError or any OSError: a 451, never a crash
            return SpoolError(str(exc) or type(exc).__name__)
        return f"queue {', '.join(getattr(item, 'name', '?') for item in items)}"

    def _delivered(self, message: Message, outcome: Outcome) -> None:
        """``outcome``: the message's name in the spool (durable), or why it could not be stored."""
        error = None
        if isinstance(outcome, SpoolError):
            error = str(outcome)
        else:
            self.log.mid_spooled(message.mid, outcome)
        self._delivering = False
        if self.session is None:  # the connection ended while the spool wrote: nothing left to answer
            return
        self._apply(self.session.delivered(error))
        self._update_reading()
        self._feed()
        if self._stopping:
            self.shutdown()  # the 250 is out: now the 421

    # -- SessionHooks

    def new_mid(self) -> int:
        return self.log.next_mid()

    def log_event(self, event: events.LogEvent) -> None:
        """The session's log event as its mail-log line (docs/maillog.md)."""
        log, icid = self.log, self.icid
        match event:
            case events.ConnectionRefused(reason=reason):
                log.refused(icid, reason)
            case events.TLSEstablished(protocol=protocol, cipher=cipher):
                log.tls_success(icid, protocol, cipher)
            case events.TLSFailed(reason=reason):
                log.tls_failed(icid, reason)
            case events.ClientCertChecked(state=state):
                log.client_cert(icid, state, None)
            case events.InjectionDiscarded(nbytes=nbytes, preview=preview):
                log.injection_discarded(icid, nbytes, preview)
            case events.ProtocolViolation(what=what):
                log.protocol_error(icid, what)
            case events.MessageStarted(mid=mid):
                log.mid_start(mid, icid)
            case events.SenderAccepted(mid=mid, address=address):
                log.mid_from(mid, icid, address)
            case events.RecipientAccepted(mid=mid, rid=rid, address=address):
                log.mid_rcpt(mid, icid, rid, address)
            case events.RecipientRefused(address=address, reason=reason):
                log.message_refused(icid, f"RCPT <{address}> refused ({reason})")
            case events.MessageReady(mid=mid, nbytes=nbytes):
                log.mid_ready(mid, nbytes)
            case events.MessageRefused(mid=mid, reason=reason):
                log.message_refused(icid, f"MID {mid}: {reason}")
            case _:
                raise ValueError(f"unknown session event {event!r}")

    # -- stopping cleanly (see ListenerFactory.shutdown)

    _stopping = False

    def abort(self) -> None:
        """Drop the connection now (a clean stop's grace is over)."""
        self._close(abort=True)

    def shutdown(self) -> None:
        """The server is stopping: the session's 421 and close, after the 250 of a message being spooled."""
        self._stopping = True
        if self.session is None:  # turned away before a session began: its 421 and close are under way
            self._close(abort=False)
            return
        actions = self.session.shutdown()
        self._apply(actions)
        if actions and self._tls_done:
            self.owner.linger(self, TLS_CLOSE_WAIT)  # the 421 is flushed by then; close_notify may never come


def _reason_text(reason: Failure | None) -> str:
    if reason is None:
        return "connection lost"
    if isinstance(reason.value, SSL.Error):
        return tls_error_reason(reason.value)
    return str(reason.value) or type(reason.value).__name__
