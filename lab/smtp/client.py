"""The scripted client engine: one Twisted protocol that interprets steps over any carrier.

The same engine is every simulated sending MTA (the behaviours of ``lab.smtp.behaviours`` are step lists) and
also the "correct client" the lab shows: it parses replies per RFC 5321 with a line limit, discards server
bytes buffered behind the 220 to STARTTLS (response injection), forgets the capability list after TLS, notices
when a server executes bytes injected behind STARTTLS, and bounds every wait by the clock it is given.
"""

from __future__ import annotations

import contextlib
import re
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLClientConnectionCreator, IReactorTime
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from lab.policy.fallback import ClientTLS as Behaviour
from lab.policy.fallback import Next, Problem, after, attempts_starttls
from lab.smtp.core.errors import ReplyError
from lab.smtp.core.events import ReceivedReply as Reply
from lab.smtp.core.readers import MAX_REPLY_LINE as MAX_REPLY_LINE
from lab.smtp.core.readers import ReplyReader
from lab.smtp.steps import (
    Ehlo,
    ExpectClose,
    Helo,
    If,
    Mail,
    Quit,
    Raw,
    Reconnect,
    Send,
    StartTLS,
    Step,
    TLSOptions,
    TLSPolicy,
    Wait,
)
from lab.smtp.transcript import Transcript
from lab.tls.tlsctx import tls_error_reason, tls_facts

TLSFactory = Callable[[TLSOptions], IOpenSSLClientConnectionCreator]
Connect = Callable[[ClientFactory], Deferred[Any]]

#: Replies received but not yet consumed by a step: past this the connection is not read (a flooding server
#: cannot grow the client); reading resumes as the steps consume them.
MAX_QUEUED_REPLIES = 1000
#: Body lines shown in the transcript before the rest is summarised.
BODY_LINES_SHOWN = 20
_VERB = re.compile(r"^[A-Za-z]{1,16}$")


@dataclass
class ConnectionInfo:
    """One TCP connection the client opened, with virtual times."""

    number: int
    client: tuple[str, int] | None
    server: tuple[str, int] | None
    opened: float
    closed: float | None = None
    closed_by: str | None = None  # client | server
    tls: bool = False


@dataclass
class ClientRecord:
    """What one run of the client saw: the transcript, the observations, the connections."""

    transcript: list[str]
    observed: dict[str, Any]
    connections: list[ConnectionInfo]
    times: list[float] = field(default_factory=list)


class _End(Exception):
    """The script ends here (the reason is already in the transcript)."""


class _Conn:
    """The state of one connection as the engine sees it."""

    def __init__(self, protocol: _ClientProtocol, info: ConnectionInfo) -> None:
        self.protocol = protocol
        self.info = info
        self.reader = ReplyReader()
        self.replies: deque[Reply] = deque()
        self.error: str | None = None
        self.tls = False
        self.tls_pending = False
        self.creator: Any = None
        self.verified: bool | None = None  # the server certificate, once TLS is up
        self.caps: list[str] = []
        self.banner: int | None = None
        self.sent_in_tls = 0
        self.client_closing = False
        self.lost: Failure | None = None
        self.is_lost = False
        self.reading_paused = False

    @property
    def transport(self) -> Any:
        return self.protocol.transport

    @property
    def usable(self) -> bool:
        return not self.is_lost and not self.client_closing and self.error is None


@implementer(IHandshakeListener)
class _ClientProtocol(Protocol):
    """A thin shell: every event goes to the engine."""

    def __init__(self, engine: ScriptedClient) -> None:
        self.engine = engine
        self.conn: _Conn | None = None

    def connectionMade(self) -> None:
        self.engine._made(self)

    def dataReceived(self, data: bytes) -> None:
        self.engine._received(self, data)

    def handshakeCompleted(self) -> None:
        self.engine._handshake_done(self)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.engine._lost(self, reason)


class _Factory(ClientFactory):
    def __init__(self, engine: ScriptedClient) -> None:
        self.engine = engine

    def buildProtocol(self, addr: Any) -> _ClientProtocol:
        protocol = _ClientProtocol(self.engine)
        protocol.factory = self
        return protocol


@dataclass
class _Waiter:
    ready: Callable[[], bool]
    deferred: Deferred[bool]
    timer: Any


class ScriptedClient:
    """Runs ``steps`` once: connect (implicit), every step in order, then close.

    ``connect`` comes from the carrier (memory, loopback or real TCP), ``tls_factory`` turns a step's
    ``TLSOptions`` into a connection creator (``lab.tls.tlsctx.ClientTLSFactory``). ``target`` only labels the
    ``=== Trying`` note; ``settle`` is how long to listen after a handshake that followed injected bytes.
    """

    def __init__(
        self,
        steps: Sequence[Step],
        *,
        clock: IReactorTime,
        connect: Connect,
        tls_factory: TLSFactory,
        reply_timeout: float = 30.0,
        target: str | None = None,
        settle: float = 0.5,
        close_wait: float = 5.0,
    ) -> None:
        self.steps = list(steps)
        self.clock = clock
        self.connect = connect
        self.tls_factory = tls_factory
        self.reply_timeout = reply_timeout
        self.target = target
        self.settle = settle
        self.close_wait = close_wait
        self.transcript = Transcript(clock.seconds)
        self.connections: list[ConnectionInfo] = []
        self.observed: dict[str, Any] = {
            "connected": False,
            "connections": 0,
            "tls": False,
            "delivered": False,
            "delivered_tls": False,
            "delivered_plaintext": False,
            "aborted": False,
            "replies": {},
        }
        self.conn: _Conn | None = None
        self._waiter: _Waiter | None = None
        self._started = False

    # -- public

    def run(self) -> Deferred[ClientRecord]:
        """Deferred[ClientRecord]; it always fires (a harness fault fails it), never hangs."""
        if self._started:
            raise RuntimeError("a ScriptedClient runs once")
        self._started = True
        return Deferred.fromCoroutine(self._main())

    @property
    def record(self) -> ClientRecord:
        return ClientRecord(list(self.transcript.lines), self.observed, self.connections, list(self.transcript.times))

    # -- protocol events

    def _made(self, protocol: _ClientProtocol) -> None:
        transport = protocol.transport
        number = len(self.connections) + 1
        info = ConnectionInfo(
            number, _address(transport.getHost()), _address(transport.getPeer()), self.clock.seconds()
        )
        self.connections.append(info)
        self.observed["connections"] = number
        protocol.conn = self.conn = _Conn(protocol, info)
        peer = info.server[0] if info.server else "?"
        self.transcript.note(f"Connected to {peer}.")
        self._poke()

    def _received(self, protocol: _ClientProtocol, data: bytes) -> None:
        conn = protocol.conn
        if conn is None or conn.error is not None:
            return
        conn.reader.feed(data)
        try:
            self._parse(conn)
        except ReplyError as exc:
            if exc.line is not None:
                self.transcript.received(exc.line, tls=conn.tls)
            conn.error = str(exc)
            conn.reader.clear()
            self.transcript.error(f"{exc}; closing the connection")
            self.observed["aborted"] = True
            conn.client_closing = True
            conn.transport.abortConnection()
        if conn.tls and conn.sent_in_tls == 0 and conn.replies:
            self._injection_executed(conn)
        self._flow(conn)
        self._poke()

    def _flow(self, conn: _Conn) -> None:
        """Stop reading while too many replies wait for a step; read again once they are consumed."""
        pause = len(conn.replies) >= MAX_QUEUED_REPLIES
        if pause == conn.reading_paused or conn.is_lost:
            return
        conn.reading_paused = pause
        if pause:
            conn.transport.pauseProducing()
        else:
            conn.transport.resumeProducing()

    def _handshake_done(self, protocol: _ClientProtocol) -> None:
        conn = protocol.conn
        if conn is None:
            return
        conn.tls, conn.tls_pending = True, False
        conn.info.tls = True
        self._poke()

    def _lost(self, protocol: _ClientProtocol, reason: Failure | None) -> None:
        conn = protocol.conn
        if conn is None or conn.is_lost:
            return
        conn.is_lost, conn.lost = True, reason
        conn.info.closed = self.clock.seconds()
        conn.info.closed_by = "client" if conn.client_closing else "server"
        self._poke()

    # -- reply parsing (RFC 5321 4.2)

    def _parse(self, conn: _Conn) -> None:
        """Each reply line into the transcript, each complete reply into the queue (``lab.smtp.core``)."""
        while (event := conn.reader.next_line()) is not None:
            self.transcript.received(event.line, tls=conn.tls)
            if event.reply is not None:
                conn.replies.append(event.reply)

    def _injection_executed(self, conn: _Conn) -> None:
        """A reply inside TLS before the client sent anything there: the server ran injected plaintext."""
        codes = ", ".join(str(r.code) for r in conn.replies)
        self.transcript.error(
            f"reply ({codes}) inside TLS before the client sent anything: the server executed injected commands"
        )
        self.observed["injection_executed"] = True
        conn.replies.clear()

    # -- waiting, always bounded by the clock

    def _poke(self) -> None:
        waiter = self._waiter
        if waiter is not None and waiter.ready():
            self._waiter = None
            if waiter.timer.active():
                waiter.timer.cancel()
            waiter.deferred.callback(True)

    async def _until(self, ready: Callable[[], bool], timeout: float) -> bool:
        """True as soon as ``ready()`` holds, False when ``timeout`` virtual seconds pass first."""
        if ready():
            return True
        deferred: Deferred[bool] = Deferred()

        def expire() -> None:
            if self._waiter is not None and self._waiter.deferred is deferred:
                self._waiter = None
                deferred.callback(False)

        self._waiter = _Waiter(ready, deferred, self.clock.callLater(timeout, expire))
        return bool(await deferred)

    async def _reply(self, what: str) -> Reply:
        conn = self._need()
        await self._until(lambda: bool(conn.replies) or conn.is_lost or conn.error is not None, self.reply_timeout)
        if conn.replies:
            reply = conn.replies.popleft()
            self._flow(conn)
            return reply
        if conn.error is not None:
            raise _End
        if conn.is_lost:
            self.transcript.error(f"connection closed by the server while waiting for the reply to {what}")
            raise _End
        self.transcript.error(f"timeout: no reply to {what} within {self.reply_timeout:g}s")
        self.observed["aborted"] = True
        self._close(conn, abort=True)
        raise _End

    def _need(self) -> _Conn:
        conn = self.conn
        if conn is None or not conn.usable:
            self.transcript.error("not connected: the script ends")
            raise _End
        return conn

    # -- writing

    def _write(self, data: bytes, *, body: bool = False) -> None:
        conn = self._need()
        self.transcript.sent(data, tls=conn.tls, max_lines=BODY_LINES_SHOWN if body else None)
        if conn.tls:
            conn.sent_in_tls += 1
        conn.transport.write(data)

    def _close(self, conn: _Conn, *, abort: bool = False) -> None:
        if conn.is_lost or conn.client_closing:
            return
        conn.client_closing = True
        if abort:
            conn.transport.abortConnection()
        else:
            conn.transport.loseConnection()

    async def _wait_closed(self, conn: _Conn, timeout: float) -> bool:
        return await self._until(lambda: conn.is_lost, timeout)

    # -- observations

    def _label(self, default: str, step: Step | None, prefix: str = "") -> str:
        conn = self.conn
        if step is not None and step.label and not prefix:
            base = step.label
        else:
            base = prefix + default + ("/tls" if conn is not None and conn.tls else "")
        replies = self.observed["replies"]
        label, n = base, 1
        while label in replies:
            n += 1
            label = f"{base}#{n}"
        return label

    def _note_reply(self, default: str, step: Step | None, reply: Reply, prefix: str = "") -> None:
        self.observed["replies"][self._label(default, step, prefix)] = reply.code

    async def _check(self, step: Step, code: int) -> None:
        """Apply ``expect``: a mismatch ends the script (aborted) unless ``on_mismatch: continue``."""
        if step.expects(code):
            return
        wanted = ", ".join(step.expect)
        if step.on_mismatch == "continue":
            self.transcript.note(f"expected {wanted}, got {code}; going on")
            return
        self.transcript.error(f"expected {wanted}, got {code}: giving up")
        await self._give_up()

    async def _give_up(self) -> None:
        """The client's own decision to stop: QUIT if the connection still works, then end the script."""
        self.observed["aborted"] = True
        conn = self.conn
        if conn is not None and conn.usable and not conn.tls_pending:
            with contextlib.suppress(_End):
                await self._quit(None)
        raise _End

    # -- the script

    async def _main(self) -> ClientRecord:
        try:
            await self._open()
            await self._run(self.steps)
        except _End:
            pass
        except BaseException:  # a bad TLS option or a lab fault: never leave a connection behind
            if self.conn is not None:
                self._close(self.conn, abort=True)
            raise
        conn = self.conn
        if conn is not None and not conn.is_lost:
            self._close(conn)
            if not await self._wait_closed(conn, self.close_wait):
                conn.transport.abortConnection()
                await self._wait_closed(conn, self.close_wait)
        if self.connections:
            self.observed["closed_by"] = self.connections[-1].closed_by or "client"
        return self.record

    async def _run(self, steps: Sequence[Step]) -> None:
        for step in steps:
            await self._step(step)

    async def _step(self, step: Step) -> None:
        if isinstance(step, Ehlo):
            await self._ehlo(step.name, step)
        elif isinstance(step, Helo):
            await self._helo(step)
        elif isinstance(step, Send):
            await self._send(step)
        elif isinstance(step, Raw):
            await self._raw(step)
        elif isinstance(step, StartTLS):
            await self._starttls(step)
        elif isinstance(step, Mail):
            await self._mail(step)
        elif isinstance(step, Quit):
            await self._quit(step)
        elif isinstance(step, Wait):
            await self._until(lambda: False, step.seconds)
        elif isinstance(step, Reconnect):
            await self._reconnect(step)
        elif isinstance(step, ExpectClose):
            await self._expect_close(step)
        elif isinstance(step, If):
            caps = self.conn.caps if self.conn is not None else []
            await self._run(step.then if step.capability in caps else step.else_)
        elif isinstance(step, TLSPolicy):
            await self._tls_policy(step)
        else:  # pragma: no cover - steps_from_data only builds the types above
            raise TypeError(f"unknown step {step!r}")

    async def _open(self, step: Step | None = None) -> None:
        self.transcript.note(f"Trying {self.target}..." if self.target else "Trying...")
        before = len(self.connections)
        deferred = self.connect(_Factory(self))
        deferred.addTimeout(self.reply_timeout, self.clock)
        try:
            await deferred
        except Exception as exc:  # refused, unreachable, timed out: all end the script the same way
            if len(self.connections) == before:
                self.transcript.error(f"connection failed: {_reason(exc)}")
                raise _End from None
        banner = await self._reply("the greeting")
        conn = self._need()
        conn.banner = banner.code
        if not self.observed["connected"]:
            self.observed["connected"] = True
            self.observed["banner"] = banner.code
        if step is not None:
            if step.label:
                self._note_reply("CONNECT", step, banner)
            await self._check(step, banner.code)

    async def _command(self, line: str, step: Step | None, what: str | None = None) -> Reply:
        verb = line.split(" ", 1)[0].upper()
        self._write(line.encode("utf-8") + b"\r\n")
        reply = await self._reply(what or verb)
        self._note_reply(verb if _VERB.match(verb) else "SEND", step, reply)
        return reply

    async def _ehlo(self, name: str, step: Step | None) -> Reply:
        reply = await self._command(f"EHLO {name}", step)
        conn = self._need()
        conn.caps = [_capability(text) for text in reply.lines[1:]] if reply.code == 250 else []
        if "starttls_advertised" not in self.observed:
            self.observed["starttls_advertised"] = "STARTTLS" in conn.caps
        if step is not None:
            await self._check(step, reply.code)
        return reply

    async def _helo(self, step: Helo) -> None:
        reply = await self._command(f"HELO {step.name}", step)
        self._need().caps = []
        await self._check(step, reply.code)

    async def _send(self, step: Send) -> None:
        reply = await self._command(step.line, step)
        await self._check(step, reply.code)

    async def _raw(self, step: Raw) -> None:
        if step.separate:
            for chunk in step.chunks:
                self._write(chunk)
        else:
            self._write(step.data)
        verbs = [_raw_verb(line) for line in step.data.split(b"\n")]
        for i in range(step.expected_replies):
            reply = await self._reply(f"raw line {i + 1}")
            self._note_reply(verbs[i] if i < len(verbs) else "RAW", step, reply)
            await self._check(step, reply.code)
        if step.settle is not None:
            await self._settle_raw(step, verbs)

    async def _settle_raw(self, step: Raw, verbs: list[str]) -> None:
        """Listen ``step.settle`` seconds more: replies beyond the expected ones are recorded, not left queued."""
        conn = self.conn
        if conn is None:
            return
        await self._until(lambda: conn.is_lost or conn.error is not None, step.settle or 0.0)
        extra = 0
        while conn.replies:
            i = step.expected_replies + extra
            self._note_reply(verbs[i] if i < len(verbs) else "RAW", step, conn.replies.popleft())
            extra += 1
        if extra:
            self.transcript.note(f"{extra} more reply(ies) than the {step.expected_replies} expected")

    async def _starttls(self, step: StartTLS) -> None:
        conn = self._need()
        line = b"STARTTLS" + (b" " + step.argument.encode("utf-8") if step.argument is not None else b"") + b"\r\n"
        if step.inject:
            self.transcript.sent(line, tls=conn.tls)
            self.transcript.note(f"injecting {len(step.inject)} bytes in the same write behind STARTTLS")
            self.transcript.sent(step.inject, tls=conn.tls)
            if conn.tls:
                conn.sent_in_tls += 1
            conn.transport.write(line + step.inject)
        else:
            self._write(line)
        reply = await self._reply("STARTTLS")
        self._note_reply("STARTTLS", step, reply)
        self.observed.setdefault("starttls_reply", reply.code)
        await self._check(step, reply.code)
        if reply.code != 220:
            if step.inject:
                await self._injected_replies(conn, step)
            return
        if conn.tls:
            self.transcript.error("220 to STARTTLS inside TLS: not starting TLS twice")
            await self._give_up()
        await self._after_220(step.tls, injected=bool(step.inject))

    async def _injected_replies(self, conn: _Conn, step: StartTLS) -> None:
        """STARTTLS was refused, so the injected lines were ordinary pipelined commands: read one reply each."""
        for line in (line for line in step.inject.split(b"\r\n") if line):
            reply = await self._reply(f"injected {_raw_verb(line)}")
            self._note_reply(_raw_verb(line), step, reply)
            if reply.code == 354:  # the server now reads a message body: hang up rather than send one
                self.transcript.note("the injected DATA was accepted in plaintext; closing instead of sending a body")
                self.observed["aborted"] = True
                conn.transport.abortConnection()
                raise _End

    async def _after_220(self, options: TLSOptions, *, injected: bool) -> bool:
        """Discard what the server sent behind the 220, then do (or fake) the handshake; True if TLS is up."""
        conn = self._need()
        leftover = sum(r.size for r in conn.replies) + conn.reader.unconsumed
        if leftover:
            self.transcript.note(f"discarded {leftover} bytes of server data received after 220 (response injection)")
            conn.replies.clear()
            conn.reader.clear()
            self._flow(conn)
        self.observed["response_injection_discarded"] = bool(
            leftover or self.observed.get("response_injection_discarded")
        )
        if options.plaintext_after_220:
            self.transcript.note("ignoring the 220: going on in plaintext instead of a ClientHello")
            return False
        if options.abort_mid_handshake:
            await self._abort_handshake(conn, options)
            return False
        return await self._handshake(conn, options, injected=injected)

    async def _handshake(self, conn: _Conn, options: TLSOptions, *, injected: bool) -> bool:
        creator = self.tls_factory(options)
        conn.creator, conn.tls_pending = creator, True
        conn.transport.startTLS(creator)
        await self._until(lambda: conn.tls or conn.is_lost, self.reply_timeout)
        if conn.tls:
            self._tls_up(conn, creator)
            if injected:
                await self._until(lambda: conn.is_lost or bool(self.observed.get("injection_executed")), self.settle)
                self.observed.setdefault("injection_executed", False)
            return True
        conn.tls_pending = False
        if conn.is_lost:
            reason = _tls_reason(conn.lost)
            self.transcript.error(f"TLS handshake failed: {reason}")
        else:
            reason = f"timeout after {self.reply_timeout:g}s"
            self.transcript.error(f"timeout: TLS handshake not done within {self.reply_timeout:g}s")
            self._close(conn, abort=True)
        self.observed.setdefault("tls_error", reason)
        return False

    def _tls_up(self, conn: _Conn, creator: Any) -> None:
        handle = conn.transport.getHandle()
        facts = tls_facts(handle)
        self.transcript.note(f"TLS started with cipher {facts.version}:{facts.cipher}:{facts.bits}")
        verified = None
        check = getattr(creator, "server_cert_verified", None)
        if check is not None:
            verified = bool(check(handle))
            name = getattr(creator, "server_name", None)
            self.transcript.note(
                f"TLS server certificate {'verified' if verified else 'not verified'}"
                + (f" for {name}" if name else " (no server name to verify against)")
                + (f" (subject {facts.peer_subject})" if facts.peer_subject else "")
            )
        conn.caps = []  # RFC 3207 4.2: forget what was learnt before TLS
        conn.verified = verified
        if not self.observed["tls"]:
            self.observed.update(tls=True, tls_version=facts.version, tls_cipher=facts.cipher)
            if verified is not None:
                self.observed["server_cert_verified"] = verified

    async def _abort_handshake(self, conn: _Conn, options: TLSOptions) -> None:
        """Send a real ClientHello, then close: the server sees a handshake cut short."""
        tls = self.tls_factory(options).clientConnectionForTLS(conn.protocol)
        with contextlib.suppress(SSL.WantReadError):
            tls.do_handshake()
        hello = tls.bio_read(65536)
        self.transcript.note(f"sent a ClientHello ({len(hello)} bytes), closing mid-handshake")
        conn.transport.write(hello)
        self.observed.setdefault("tls_error", "aborted by the client after the ClientHello")
        self._close(conn)
        await self._wait_closed(conn, self.close_wait)

    async def _mail(self, step: Mail) -> None:
        prefix = f"{step.label}." if step.label else ""
        reply = await self._command(f"MAIL FROM:<{step.mail_from}>", None)
        self._relabel("MAIL", prefix)
        if not reply.positive:
            return await self._check(step, reply.code)
        accepted = 0
        for rcpt in step.rcpt_to:
            reply = await self._command(f"RCPT TO:<{rcpt}>", None)
            self._relabel("RCPT", prefix)
            accepted += reply.positive
        if not accepted:
            return await self._check(step, reply.code)
        reply = await self._command("DATA", None)
        self._relabel("DATA", prefix)
        if reply.code != 354:
            return await self._check(step, reply.code)
        conn = self._need()
        self._write(message_bytes(step), body=True)
        reply = await self._reply("the end of the message")
        self._note_reply("DOT", None, reply, prefix)
        if 200 <= reply.code < 300:
            self.observed["delivered"] = True
            self.observed["delivered_tls" if conn.tls else "delivered_plaintext"] = True
        await self._check(step, reply.code)

    def _relabel(self, name: str, prefix: str) -> None:
        """``_command`` labelled the reply by its verb; a labelled ``mail`` step prefixes it."""
        if not prefix:
            return
        replies = self.observed["replies"]
        last = next(reversed(replies))
        code = replies.pop(last)
        replies[self._label(name, None, prefix)] = code

    async def _quit(self, step: Step | None) -> None:
        conn = self._need()
        reply = await self._command("QUIT", step)
        if step is not None:
            await self._check(step, reply.code)
        if not await self._wait_closed(conn, self.close_wait):
            self._close(conn)
            await self._wait_closed(conn, self.close_wait)

    async def _reconnect(self, step: Reconnect) -> None:
        conn = self.conn
        if conn is not None and not conn.is_lost:
            self._close(conn)
            if not await self._wait_closed(conn, self.close_wait):
                conn.transport.abortConnection()
                await self._wait_closed(conn, self.close_wait)
        await self._open(step)

    async def _expect_close(self, step: ExpectClose) -> None:
        conn = self.conn
        if conn is None:
            return
        if await self._wait_closed(conn, self.reply_timeout):
            return
        self.transcript.error(f"timeout: the server did not close within {self.reply_timeout:g}s")
        if step.on_mismatch == "continue":
            return
        self.observed["aborted"] = True
        self._close(conn)
        raise _End

    # -- the composite: EHLO, then what the fallback table says

    async def _tls_policy(self, step: TLSPolicy) -> None:
        behaviour = step.behaviour
        conn = self._need()
        if conn.banner is not None and conn.banner != 220:
            self.transcript.error(f"greeting {conn.banner}: the server does not want mail from us")
            await self._give_up()
        reply = await self._ehlo(step.ehlo, None)
        advertised = reply.code == 250 and "STARTTLS" in conn.caps
        if behaviour is Behaviour.SKIP:
            return
        self.observed.setdefault("fell_back", False)
        if not attempts_starttls(behaviour, advertised):
            return await self._decide(step, Problem.NOT_ADVERTISED, "STARTTLS not advertised")
        self._write(b"STARTTLS\r\n")
        reply = await self._reply("STARTTLS")
        self._note_reply("STARTTLS", None, reply)
        self.observed.setdefault("starttls_reply", reply.code)
        if reply.code != 220:
            return await self._decide(step, Problem.REFUSED, f"STARTTLS answered {reply.code}")
        if not await self._after_220(step.tls, injected=False):
            if step.tls.plaintext_after_220:
                return
            if step.tls.abort_mid_handshake:
                self.observed["aborted"] = True
                raise _End
            return await self._decide(step, Problem.HANDSHAKE_FAILED, "the TLS handshake failed")
        if conn.verified is False and after(behaviour, Problem.VERIFY_FAILED) is not Next.IGNORE:
            await self._decide(step, Problem.VERIFY_FAILED, "the server certificate did not verify")
        await self._ehlo(step.ehlo, None)

    async def _decide(self, step: TLSPolicy, problem: Problem, why: str) -> None:
        nxt = after(step.behaviour, problem)
        conn = self.conn
        if nxt is Next.PLAINTEXT and (conn is None or not conn.usable):
            nxt = Next.RETRY_PLAINTEXT
        words = {
            Next.PLAINTEXT: "going on in plaintext",
            Next.RETRY_PLAINTEXT: "retrying the delivery in plaintext on a new connection",
            Next.ABORT: "giving up",
            Next.IGNORE: "going on (this client does not require it)",
        }
        self.transcript.note(f"{step.behaviour.value}: {why}: {words[nxt]}")
        if nxt is Next.ABORT:
            await self._give_up()
        if nxt is Next.IGNORE:
            return
        self.observed["fell_back"] = True
        if nxt is Next.RETRY_PLAINTEXT:
            if conn is not None and conn.usable:
                await self._quit(None)
            await self._reconnect(Reconnect())
            await self._ehlo(step.ehlo, None)


def message_bytes(step: Mail) -> bytes:
    """The DATA content of a ``mail`` step: headers, body, marker, padding to ``size``, dot-stuffed, final dot."""
    to = step.rcpt_to[0] if step.rcpt_to else ""
    lines = [f"From: <{step.mail_from}>", f"To: <{to}>", "Subject: smtplab test message", ""]
    if step.body is not None:
        lines += step.body.replace("\r\n", "\n").split("\n")
    if step.marker:
        lines.append(step.marker)
    text = "".join(f"{line}\r\n" for line in lines)
    if step.size is not None:
        filler = "x" * 76 + "\r\n"
        missing = step.size - len(text.encode("utf-8"))
        if missing > 0:
            count, rest = divmod(missing, len(filler))
            text += filler * count + ("x" * max(rest - 2, 0) + "\r\n" if rest else "")
    stuffed = "".join("." + line if line.startswith(".") else line for line in text.splitlines(keepends=True))
    return stuffed.encode("utf-8") + b".\r\n"


def _capability(text: bytes) -> str:
    words = text.decode("ascii", "replace").split()
    return words[0].upper() if words else ""


def _raw_verb(line: bytes) -> str:
    word = line.split(b" ", 1)[0].strip(b"\r").decode("ascii", "replace")
    return word.upper() if _VERB.match(word) else "RAW"


def _address(address: Any) -> tuple[str, int] | None:
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    return (str(host), int(port)) if host is not None and port is not None else None


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.split(": ", 1)[-1] if text.startswith(("Connection", "An error")) else text


def _tls_reason(reason: Failure | None) -> str:
    if reason is None:
        return "connection lost"
    if isinstance(reason.value, SSL.Error):
        return tls_error_reason(reason.value)
    return f"connection closed during the handshake ({type(reason.value).__name__})"
