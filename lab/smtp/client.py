"""The scripted client engine's Twisted shell: connections, the reply queue, writes and closes.

The same engine is every simulated sending MTA (the behaviours of ``lab.smtp.behaviours`` are step lists) and
also the "correct client" the lab shows: it parses replies per RFC 5321 with a line limit, discards server
bytes buffered behind the 220 to STARTTLS (response injection), forgets the capability list after TLS, notices
when a server executes bytes injected behind STARTTLS, and bounds every wait by the clock it is given.

This module holds the Twisted side and the per-connection state; the steps are interpreted by
``lab.smtp.interpreter``, observations are written by ``lab.smtp.record``, waits live in ``lab.smtp.waits`` and
the message a ``mail`` step sends is built by ``lab.smtp.message``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLClientConnectionCreator, IReactorTime
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from lab.net.transport import SessionTransport
from lab.smtp.core.errors import ReplyError
from lab.smtp.core.events import ReceivedReply as Reply
from lab.smtp.core.readers import MAX_REPLY_LINE as MAX_REPLY_LINE
from lab.smtp.core.readers import ReplyReader
from lab.smtp.message import message_bytes
from lab.smtp.record import ClientRecord, ConnectionInfo, Recorder
from lab.smtp.steps import Step, TLSOptions
from lab.smtp.transcript import Kind, Transcript
from lab.smtp.waits import Waits

__all__ = [
    "MAX_REPLY_LINE",
    "ClientRecord",
    "ConnectionInfo",
    "Reply",
    "ScriptedClient",
    "message_bytes",
]

TLSFactory = Callable[[TLSOptions], IOpenSSLClientConnectionCreator]
Connect = Callable[[ClientFactory], Deferred[Any]]

#: Replies received but not yet consumed by a step: past this the connection is not read (a flooding server
#: cannot grow the client); reading resumes as the steps consume them.
MAX_QUEUED_REPLIES = 1000
#: Body lines shown in the transcript before the rest is summarised.
BODY_LINES_SHOWN = 20


class End(Exception):
    """The script ends here (the reason is already in the transcript)."""


class Conn:
    """The state of one connection as the engine sees it."""

    def __init__(self, protocol: _ClientProtocol, info: ConnectionInfo) -> None:
        self.protocol = protocol
        self.info = info
        self.reader = ReplyReader()  # the one reply parser (lab.smtp.core)
        self.replies: deque[Reply] = deque()
        self.error: str | None = None
        self.tls = False
        self.tls_pending = False
        self.verified: bool | None = None  # the server certificate, once TLS is up
        self.caps: list[str] = []
        self.banner: int | None = None
        self.sent_in_tls = 0
        self.client_closing = False
        self.lost: Failure | None = None
        self.is_lost = False
        self.reading_paused = False

    @property
    def transport(self) -> SessionTransport:
        return self.protocol.transport

    @property
    def usable(self) -> bool:
        return not self.is_lost and not self.client_closing and self.error is None

    def discard_buffered(self) -> int:
        """Drop every byte received and not yet consumed; how many there were."""
        leftover = sum(r.size for r in self.replies) + self.reader.unconsumed
        self.replies.clear()
        self.reader.clear()
        return leftover


@implementer(IHandshakeListener)
class _ClientProtocol(Protocol):
    """A thin shell: every event goes to the engine."""

    transport: SessionTransport  # what every carrier connects a protocol to; set before connectionMade

    def __init__(self, engine: ScriptedClient) -> None:
        self.engine = engine
        self.conn: Conn | None = None

    def connectionMade(self) -> None:
        self.engine._made(self)

    def dataReceived(self, data: bytes) -> None:
        self.engine._received(self, data)

    def handshakeCompleted(self) -> None:
        self.engine._handshake_done(self)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.engine._lost(self, reason)


class _Factory(ClientFactory):
    def __init__(self, engine: ScriptedClient) -> None:
        self.engine = engine

    def buildProtocol(self, addr: Any) -> _ClientProtocol:
        protocol = _ClientProtocol(self.engine)
        protocol.factory = self
        return protocol


class ScriptedClient:
    """Runs ``steps`` once: connect (implicit), every step in order, then close.

    ``connect`` comes from the carrier (memory, loopback, netns or real TCP), ``tls_factory`` turns a step's
    ``TLSOptions`` into a connection creator (``lab.tls.tlsctx.ClientTLSFactory`` builds the lab's). ``target``
    only labels the ``=== Trying`` note; ``settle`` is how long to listen after a handshake that followed
    injected bytes.
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
        self.recorder = Recorder()
        self.waits = Waits(clock)
        self.conn: Conn | None = None
        self._started = False

    # -- public

    def run(self, body: Callable[[], Awaitable[None]] | None = None) -> Deferred[ClientRecord]:
        """Deferred[ClientRecord]; it always fires (a harness fault fails it), never hangs.

        ``body`` replaces the step list (the appliance's delivery client, ``lab.outbound.client``, drives the same
        shell and interpreter with its own coroutine); it ends early by raising ``End``.
        """
        if self._started:
            raise RuntimeError("a ScriptedClient runs once")
        self._started = True
        return Deferred.fromCoroutine(self._main(body))

    @property
    def record(self) -> ClientRecord:
        return self.recorder.record(self.transcript)

    @property
    def observed(self) -> Any:
        return self.recorder.obs

    @property
    def connections(self) -> list[ConnectionInfo]:
        return self.recorder.connections

    # -- protocol events

    def _made(self, protocol: _ClientProtocol) -> None:
        transport = protocol.transport
        number = len(self.connections) + 1
        info = ConnectionInfo(
            number, _address(transport.getHost()), _address(transport.getPeer()), self.clock.seconds()
        )
        self.recorder.opened(info)
        protocol.conn = self.conn = Conn(protocol, info)
        peer = info.server[0] if info.server else "?"
        self.transcript.note(f"Connected to {peer}.", Kind.CONNECTED)
        self.waits.poke()

    def _received(self, protocol: _ClientProtocol, data: bytes) -> None:
        conn = protocol.conn
        if conn is None or conn.error is not None:
            return
        conn.reader.feed(data)
        try:
            self._parse(conn)
        except ReplyError as exc:
            if exc.line is not None:  # the offending line goes into the transcript as received
                self.transcript.received(exc.line, tls=conn.tls, size=len(exc.data))
            conn.error = str(exc)
            conn.reader.clear()
            self.transcript.error(f"{exc}; closing the connection", Kind.BAD_REPLY)
            self.recorder.aborted()
            conn.client_closing = True
            conn.transport.abortConnection()
        if conn.tls and conn.sent_in_tls == 0 and conn.replies:
            self._injection_executed(conn)
        self.flow(conn)
        self.waits.poke()

    def flow(self, conn: Conn) -> None:
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
        self.waits.poke()

    def _lost(self, protocol: _ClientProtocol, reason: Failure | None) -> None:
        conn = protocol.conn
        if conn is None or conn.is_lost:
            return
        conn.is_lost, conn.lost = True, reason
        conn.info.closed = self.clock.seconds()
        conn.info.closed_by = "client" if conn.client_closing else "server"
        self.waits.poke()

    # -- reply parsing (RFC 5321 4.2)

    def _parse(self, conn: Conn) -> None:
        """Each reply line into the transcript, each complete reply into the queue (``lab.smtp.core``)."""
        while (event := conn.reader.next_line()) is not None:
            self.transcript.received(event.line, tls=conn.tls, size=event.size)
            if event.reply is not None:
                conn.replies.append(event.reply)

    def _injection_executed(self, conn: Conn) -> None:
        """A reply inside TLS before the client sent anything there: the server ran injected plaintext."""
        codes = ", ".join(str(r.code) for r in conn.replies)
        self.transcript.error(
            f"reply ({codes}) inside TLS before the client sent anything: the server executed injected commands",
            Kind.INJECTION_EXECUTED,
        )
        self.recorder.injection_executed()
        conn.replies.clear()

    # -- operations the step interpreter uses

    async def until(self, ready: Callable[[], bool], timeout: float) -> bool:
        return await self.waits.until(ready, timeout)

    async def reply(self, what: str) -> Reply:
        """The next reply; a lost connection, a bad reply or a timeout ends the script (``End``)."""
        conn = self.need()
        await self.until(lambda: bool(conn.replies) or conn.is_lost or conn.error is not None, self.reply_timeout)
        if conn.replies:
            reply = conn.replies.popleft()
            self.flow(conn)
            return reply
        if conn.error is not None:
            raise End
        if conn.is_lost:
            self.transcript.error(f"connection closed by the server while waiting for the reply to {what}", Kind.CLOSED)
            raise End
        self.transcript.error(f"timeout: no reply to {what} within {self.reply_timeout:g}s", Kind.TIMEOUT)
        self.recorder.aborted()
        self.close(conn, abort=True)
        raise End

    def need(self) -> Conn:
        """The current connection if it can still carry a command; otherwise the script ends."""
        conn = self.conn
        if conn is None or not conn.usable:
            self.transcript.error("not connected: the script ends", Kind.NOT_CONNECTED)
            raise End
        return conn

    def write(self, data: bytes, *, body: bool = False) -> None:
        conn = self.need()
        self.transcript.sent(data, tls=conn.tls, max_lines=BODY_LINES_SHOWN if body else None)
        if conn.tls:
            conn.sent_in_tls += 1
        conn.transport.write(data)

    def close(self, conn: Conn, *, abort: bool = False) -> None:
        if conn.is_lost or conn.client_closing:
            return
        conn.client_closing = True
        if abort:
            conn.transport.abortConnection()
        else:
            conn.transport.loseConnection()

    async def wait_closed(self, conn: Conn, timeout: float) -> bool:
        return await self.until(lambda: conn.is_lost, timeout)

    async def hang_up(self, conn: Conn, *, server_first: bool = False) -> None:
        """Close and wait for the close, aborting when it does not come; ``server_first``: give the server
        ``close_wait`` to close first (after QUIT)."""
        if conn.is_lost or (server_first and await self.wait_closed(conn, self.close_wait)):
            return
        self.close(conn)
        if not await self.wait_closed(conn, self.close_wait):
            conn.transport.abortConnection()
            await self.wait_closed(conn, self.close_wait)

    async def connect_once(self) -> None:
        """Open a new connection through the carrier; a failure to connect ends the script."""
        self.transcript.note(f"Trying {self.target}..." if self.target else "Trying...", Kind.TRYING)
        before = len(self.connections)
        deferred = self.connect(_Factory(self))
        deferred.addTimeout(self.reply_timeout, self.clock)
        try:
            await deferred
        except Exception as exc:  # refused, unreachable, timed out: all end the script the same way
            if len(self.connections) == before:
                self.transcript.error(f"connection failed: {_reason(exc)}", Kind.CONNECT_FAILED)
                raise End from None

    # -- the script

    async def _main(self, body: Callable[[], Awaitable[None]] | None) -> ClientRecord:
        from lab.smtp.interpreter import StepInterpreter  # it drives this shell

        try:
            await (body() if body is not None else StepInterpreter(self).run(self.steps))
        except End:
            pass
        except BaseException:  # a bad TLS option or a lab fault: never leave a connection behind
            if self.conn is not None:
                self.close(self.conn, abort=True)
            raise
        if self.conn is not None:
            await self.hang_up(self.conn)
        self.recorder.closed()
        return self.record


def _address(address: Any) -> tuple[str, int] | None:
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    return (str(host), int(port)) if host is not None and port is not None else None


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.split(": ", 1)[-1] if text.startswith(("Connection", "An error")) else text
