"""TCP for ``smtplab serve``: replies sent when written, and listening sockets several processes can share.

Twisted's TCP transport buffers every ``write`` until the reactor's next turn: an epoll modify to start
watching for writability, a turn of the loop, the ``send``, and a modify to stop watching. An SMTP reply is a
few dozen bytes that the socket almost always takes at once, so ``EagerServer`` sends it in ``write`` when
nothing is waiting before it, and buffers only what the socket did not take (then Twisted's own path goes on:
writability, backpressure to the producer, errors). The listener writes each group of replies in one write.

Under TLS, Twisted's buffering TLS protocol spends a ``callLater(0)`` and a reactor turn on every write to gather
small writes into one record; the listener already writes a group at once, so ``startTLS`` uses the plain
protocol. The records written while one read is handled (the session tickets that end a handshake and the reply
to a command that came with it; a 221 and the close_notify after it) leave together in one ``send`` when that
read is done; records written outside a read (a 250 once the spool has the message) leave at once. The bytes and
their order are the same; only when they leave changes.

``listen`` opens the port; with ``reuse_port`` the socket gets ``SO_REUSEPORT`` so that the worker processes of
``smtplab serve --workers N`` each listen on the same address and the kernel spreads connections among them.
``ServingReactor``, the reactor ``smtplab serve`` installs, is Twisted's epoll reactor without the legacy log
context it sets up around every I/O event.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from twisted.internet import _newtls, epollreactor, tcp
from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import ISSLTransport
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import directlyProvides
from zope.interface.declarations import Declaration


def _write_now(connection: Any, data: bytes) -> None:
    """``FileDescriptor.write``, but first try to send ``data`` at once when nothing is queued before it (during a
    read: once the read is done)."""
    if connection._gathered is not None:
        connection._gathered.append(data)
        return
    if (
        data
        and connection._eager
        and connection.connected
        and not connection.disconnecting
        and not connection._tempDataBuffer
        and connection.offset >= len(connection.dataBuffer)
    ):
        sent = connection.writeSomeData(data)
        if isinstance(sent, int) and sent > 0:
            data = data[sent:]
        # an error (an exception returned) falls through: the buffered write's doWrite meets it and closes
    FileDescriptor.write(connection, data)


def _send_gathered(connection: Any) -> None:
    gathered, connection._gathered = connection._gathered, None
    if gathered:
        _write_now(connection, b"".join(gathered))


class _EagerDescriptor(FileDescriptor):
    """The base the TLS layer writes its records through (``twisted.internet._newtls._BypassTLS``)."""

    def write(self, data: bytes) -> None:
        _write_now(self, data)

    def writeSequence(self, iovec: Any) -> None:
        _write_now(self, b"".join(iovec))

    def loseConnection(self) -> None:
        _send_gathered(self)
        FileDescriptor.loseConnection(self)  # type: ignore[no-untyped-call]


class _Bypass(_newtls._BypassTLS):
    """The transport the TLS layer writes through; it declares no interfaces.

    Twisted's TLS protocol re-declares on itself, one ``directlyProvides`` each, every interface its transport
    provides; ``_BypassTLS`` forwards the question to the TCP connection, which has nine, and those calls cost as
    much as a tenth of a STARTTLS session's own work in the listener. Nothing asks the TLS layer for them (the
    listener keeps the TCP connection as its transport, marked ``ISSLTransport`` by ``startTLS``).
    """

    __providedBy__ = Declaration()


class _TLSFactory(TLSMemoryBIOFactory):
    """Twisted's TLS factory with its plain protocol: the listener already gathers its replies (one write per group),
    so the buffering one's ``callLater(0)`` per write would only add a reactor turn."""

    protocol = TLSMemoryBIOProtocol


class EagerServer(tcp.Server):
    """A server-side TCP connection whose writes leave at once when the socket takes them.

    Not before its first read: the banner written in ``connectionMade`` goes out when the reactor's turn ends,
    as Twisted sends it, after the listening port's accept loop. Sent at once, a client could read it, close and
    connect again while that loop still runs, and its new connection would be counted beside the closed one
    against Max Concurrency (the close is only seen on a later turn).
    """

    _eager = False
    _gathered: list[bytes] | None = None  # the TLS records written while a read is handled

    def doRead(self) -> Any:
        self._eager = True
        if not self.TLS:  # a plaintext group of replies is one write already: it leaves at once
            return super().doRead()
        self._gathered = []
        try:
            return super().doRead()
        finally:
            _send_gathered(self)

    def write(self, data: bytes) -> None:
        if self.TLS:
            super().write(data)  # type: ignore[no-untyped-call]  # through the TLS layer, which writes its records with _EagerDescriptor
        else:
            _write_now(self, data)

    def startTLS(self, ctx: Any, normal: bool = True) -> None:
        """``twisted.internet._newtls.startTLS`` with ``_TLSFactory``, ``_Bypass`` and ``_EagerDescriptor``."""
        producer, streaming = self.producer, self.streamingProducer
        if producer is not None:
            self.unregisterProducer()  # type: ignore[no-untyped-call]
        client = self._tlsClientDefault if normal else not self._tlsClientDefault
        factory = _TLSFactory(ctx, client, None)  # type: ignore[arg-type]  # no wrapped factory: the protocol is given
        tls = factory.protocol(factory, self.protocol, False)  # type: ignore[no-untyped-call]
        self.protocol = tls
        self.getHandle = tls.getHandle  # type: ignore[method-assign]
        self.getPeerCertificate = tls.getPeerCertificate
        directlyProvides(self, ISSLTransport)
        self.TLS = True
        tls.makeConnection(_Bypass(_EagerDescriptor, self))  # type: ignore[no-untyped-call]
        if producer is not None:
            self.registerProducer(producer, streaming)  # type: ignore[no-untyped-call]


class ServingPort(tcp.Port):
    """A listening port whose connections are ``EagerServer``; ``reuse_port``: set ``SO_REUSEPORT``."""

    transport = EagerServer

    def __init__(self, *args: Any, reuse_port: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reuse_port = reuse_port

    def createInternetSocket(self) -> socket.socket:
        skt: socket.socket = super().createInternetSocket()  # type: ignore[no-untyped-call]
        if self._reuse_port:
            skt.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return skt


def listen(
    reactor: Any, port: int, factory: Any, *, backlog: int, interface: str, reuse_port: bool = False
) -> ServingPort:
    """Listen on ``interface:port`` (``CannotListenError`` if not), as ``reactor.listenTCP`` does."""
    listening = ServingPort(port, factory, backlog, interface, reactor, reuse_port=reuse_port)
    listening.startListening()
    return listening


class ServingReactor(epollreactor.EPollReactor):
    """Twisted's epoll reactor without its legacy log context around every I/O event.

    ``EPollReactor.doPoll`` runs each event through ``twisted.python.log.callWithLogger``, which copies a context
    dictionary so that a legacy log line could name the connection: about 3% of the server's CPU per STARTTLS
    session. ``smtplab serve`` logs through its mail log, and an exception in a handler is still caught and
    logged by the reactor (``_doReadOrWrite``), only without the connection's name as its log prefix.
    """

    def doPoll(self, timeout: float | None) -> None:
        try:
            events = self._poller.poll(-1 if timeout is None else timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        selectables, handle = self._selectables, self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is not None:
                handle(selectable, fd, event)  # type: ignore[no-untyped-call]

    doIteration = doPoll


def install_reactor() -> None:
    """Make ``ServingReactor`` the process's reactor (before anything imports ``twisted.internet.reactor``)."""
    from twisted.internet.main import installReactor

    installReactor(ServingReactor())  # type: ignore[no-untyped-call]
