"""SessionTransport: the transport contract (docs/architecture.md) over any raw byte pipe, with real TLS.

The listener and the scripted client only ever talk to a ``SessionTransport``. Below it sits a raw pipe: an
in-memory link, a middlebox, or a real TCP transport. ``startTLS`` layers Twisted's ``TLSMemoryBIOProtocol``
(pyOpenSSL memory BIOs, so the handshake is real) between the pipe and the application protocol, exactly as
Twisted's own TCP ``startTLS`` (``twisted.internet._newtls``) does, so the same protocol behaves the same on every
carrier. Because TLS is layered here and not in the pipe, every raw chunk (ciphertext after STARTTLS) passes this
object and is recorded into a capture ``Flow``.

Semantics kept from ``_newtls``: the rest of a chunk in whose ``dataReceived`` the protocol called ``startTLS``
stays with the protocol (it already has it); only later chunks go to TLS. ``handshakeCompleted()`` is called on
protocols that provide ``IHandshakeListener``; a failed handshake ends in ``connectionLost`` with the
``OpenSSL.SSL.Error``. ``loseConnection`` inside TLS sends close_notify first; before the handshake is done it
aborts (Twisted does the same).

Flow control is Twisted's producer/consumer contract, as on a TCP transport: the application registers itself
as a streaming producer (told to pause when the pipe cannot take more output), and calls ``pauseProducing`` /
``resumeProducing`` on this transport to stop and start reading. A paused transport hands nothing up: it asks
the pipe to stop reading (a TCP transport does) and keeps what a pipe that cannot stop still delivers (the
memory wire) until ``resumeProducing``. ``startTLS`` moves a registered producer under the TLS layer, as
``_newtls`` does, so output the TLS layer holds back pauses the application too.
"""

from __future__ import annotations

import typing
from collections.abc import Iterable
from typing import Any

from OpenSSL import SSL
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import (
    IConsumer,
    IHandshakeListener,
    IProtocol,
    IPushProducer,
    IReactorTime,
    ISSLTransport,
    ITCPTransport,
    ITLSTransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import alsoProvides, implementer

from lab.errors import HarnessError
from lab.net.capture import Direction, Flow


class _TLSLayer(typing.Protocol):
    """What this transport uses of ``TLSMemoryBIOProtocol``, whose methods Twisted leaves unannotated."""

    def makeConnection(self, transport: ITCPTransport) -> None: ...
    def dataReceived(self, data: bytes) -> None: ...
    def connectionLost(self, reason: Failure) -> None: ...
    def write(self, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def getHandle(self) -> SSL.Connection: ...
    def getPeerCertificate(self) -> Any: ...
    def registerProducer(self, producer: Any, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...


def other(direction: Direction) -> Direction:
    return Direction.S2C if direction is Direction.C2S else Direction.C2S


@implementer(IProtocol, IHandshakeListener)
class _AppSide:
    """The TLS layer's view of the application protocol.

    The application is already connected (its transport is the SessionTransport and stays so), so
    ``makeConnection`` from the TLS layer is swallowed; this is what ``_newtls`` gets with ``_connectWrapped=False``,
    done here with public API only.
    """

    def __init__(self, app: IProtocol) -> None:
        self.app = app

    def makeConnection(self, transport: Any) -> None:
        pass

    def connectionMade(self) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        self.app.dataReceived(data)

    def connectionLost(self, reason: Failure) -> None:
        self.app.connectionLost(reason)

    def handshakeCompleted(self) -> None:
        if IHandshakeListener.providedBy(self.app):
            self.app.handshakeCompleted()


@implementer(ITCPTransport)
class _BelowTLS:
    """The TLS layer's transport: ciphertext goes straight to the raw pipe (and the capture)."""

    def __init__(self, session: SessionTransport) -> None:
        self.session = session

    def write(self, data: bytes) -> None:
        self.session._raw_write(data)

    def writeSequence(self, seq: Iterable[bytes]) -> None:
        self.session._raw_write(b"".join(seq))

    def loseConnection(self) -> None:
        self.session._tls_closed()

    def abortConnection(self) -> None:
        self.session._raw_abort()

    def getPeer(self) -> IPv4Address:
        return self.session.getPeer()

    def getHost(self) -> IPv4Address:
        return self.session.getHost()

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        self.session._pipe_call("registerProducer", producer, streaming)

    def unregisterProducer(self) -> None:
        self.session._pipe_call("unregisterProducer")

    def __getattr__(self, name: str) -> Any:
        # TLSMemoryBIOProtocol (a ProtocolWrapper) forwards unknown attributes to its transport.
        return getattr(self.session.pipe, name)


@implementer(ITCPTransport, ITLSTransport, IConsumer, IPushProducer)
class SessionTransport(Protocol):
    """Transport for one application protocol over a raw pipe; the pipe sees this object as its protocol.

    ``is_client`` is the TCP role (the default TLS role too). ``flow`` receives close attribution always, and
    the raw chunks only when ``record`` is true: a carrier with both ends in the process records on one side
    (the client's), so that a flow is not written twice. ``epoch`` is subtracted from ``clock.seconds()``.
    """

    def __init__(
        self,
        protocol: IProtocol,
        *,
        host: IPv4Address,
        peer: IPv4Address,
        is_client: bool,
        clock: IReactorTime,
        flow: Flow | None = None,
        record: bool = True,
        epoch: float = 0.0,
    ) -> None:
        self.protocol = protocol
        self.host, self.peer = host, peer
        self.is_client = is_client
        self.clock = clock
        self.flow = flow
        self.record = record and flow is not None
        self.epoch = epoch
        self.outbound = Direction.C2S if is_client else Direction.S2C
        self.pipe: Any = None
        self.disconnecting = False
        self._tls: _TLSLayer | None = None
        self._lost = False
        self._producer: tuple[Any, bool] | None = None  # the application's (producer, streaming)
        self._paused = False  # the application asked us to stop reading
        self._unread: list[bytes] = []  # raw chunks the pipe delivered while paused

    # -- the pipe's side (this object is the pipe's protocol)

    def connectionMade(self) -> None:
        self.pipe = self.transport
        self.protocol.makeConnection(self)

    def dataReceived(self, data: bytes) -> None:
        if self._lost:
            return
        self._record(other(self.outbound), data)
        if self._paused:
            self._unread.append(data)
            return
        self._up(data)

    def _up(self, data: bytes) -> None:
        if self._tls is not None:
            self._tls.dataReceived(data)
        else:
            self.protocol.dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # Twisted's signature
        if self._lost:
            return
        unread, self._unread = self._unread, []
        for chunk in unread:  # what arrived before the end is the application's to see (it may be paused)
            self._up(chunk)
        self._lost = True
        self.connected = False
        self._closed_by(other(self.outbound))  # no-op when this side already closed
        if self._tls is not None:
            self._tls.connectionLost(reason)  # passes the SSL.Error of a failed handshake, as _newtls does
        else:
            self.protocol.connectionLost(reason)

    # -- the application's side (ITransport, ITLSTransport, ISSLTransport after startTLS)

    @property
    def TLS(self) -> bool:  # the name Twisted's TCP transports use
        return self._tls is not None

    def write(self, data: bytes) -> None:
        if self._lost or self.disconnecting:
            return
        if self._tls is not None:
            self._tls.write(data)
        else:
            self._raw_write(data)

    def writeSequence(self, seq: Iterable[bytes]) -> None:
        self.write(b"".join(seq))

    def loseConnection(self) -> None:
        if self._lost or self.disconnecting:
            return
        self._closed_by(self.outbound)
        self.disconnecting = True
        if self._tls is not None:
            self._tls.loseConnection()  # close_notify; the pipe closes when the TLS layer says so
        else:
            self.pipe.loseConnection()

    def abortConnection(self) -> None:
        if self._lost:
            return
        self._closed_by(self.outbound)
        self.disconnecting = True
        if self._tls is not None:
            self._tls.abortConnection()
        else:
            self.pipe.abortConnection()

    def getPeer(self) -> IPv4Address:
        return self.peer

    def getHost(self) -> IPv4Address:
        return self.host

    def getHandle(self) -> SSL.Connection | None:
        """The ``OpenSSL.SSL.Connection`` once ``startTLS`` was called, else None."""
        return self._tls.getHandle() if self._tls is not None else None

    def getPeerCertificate(self) -> Any:
        return self._tls.getPeerCertificate() if self._tls is not None else None

    def startTLS(self, creator: Any, normal: bool = True) -> None:
        """Layer TLS under the protocol; ``creator`` provides IOpenSSL{Server,Client}ConnectionCreator."""
        if self._tls is not None:
            raise HarnessError("startTLS called twice on one connection")
        if self._lost:
            return
        is_client = self.is_client if normal else not self.is_client
        # No wrapped factory: the protocol is built here around the already connected application.
        factory = TLSMemoryBIOFactory(creator, is_client, None, clock=self.clock)  # type: ignore[arg-type]
        tls: _TLSLayer = factory.protocol(factory, _AppSide(self.protocol))
        producer = self._producer
        if producer is not None:  # hooked up under TLS below, as _newtls does
            self.unregisterProducer()
        self._tls = tls
        alsoProvides(self, ISSLTransport)
        tls.makeConnection(_BelowTLS(self))  # a client's ClientHello goes out here
        if producer is not None:
            self.registerProducer(*producer)

    # -- flow control (IConsumer towards the application, IPushProducer for its reading)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self._tls is not None:
            self._tls.registerProducer(producer, streaming)
        else:
            self._pipe_call("registerProducer", producer, streaming)
        self._producer = (producer, streaming)

    def unregisterProducer(self) -> None:
        if self._producer is None:
            return
        self._producer = None
        if self._tls is not None:
            self._tls.unregisterProducer()
        else:
            self._pipe_call("unregisterProducer")

    def pauseProducing(self) -> None:
        """Stop handing received bytes up (and ask the pipe to stop reading, where it can)."""
        if self._paused or self._lost:
            return
        self._paused = True
        pause = getattr(self.pipe, "pauseProducing", None)
        if pause is not None:
            pause()

    def resumeProducing(self) -> None:
        """Hand up what was kept while paused, then read again."""
        if not self._paused or self._lost:
            return
        self._paused = False
        while self._unread and not self._paused and not self._lost:
            self._up(self._unread.pop(0))
        resume = getattr(self.pipe, "resumeProducing", None)
        if resume is not None and not self._paused and not self._lost:
            resume()

    def stopProducing(self) -> None:
        self.loseConnection()

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def getTcpNoDelay(self) -> bool:
        return True

    def setTcpKeepAlive(self, enabled: bool) -> None:
        pass

    def getTcpKeepAlive(self) -> bool:
        return False

    def loseWriteConnection(self) -> None:
        self.loseConnection()

    # -- below TLS

    def _now(self) -> float:
        return self.clock.seconds() - self.epoch

    def _record(self, direction: Direction, data: bytes) -> None:
        if self.record and data:
            assert self.flow is not None
            self.flow.record(direction, self._now(), data)

    def _closed_by(self, direction: Direction) -> None:
        if self.flow is not None:
            self.flow.close(direction, self._now())

    def _raw_write(self, data: bytes) -> None:
        if self._lost or not data:
            return
        self._record(self.outbound, data)
        self.pipe.write(data)

    def _raw_abort(self) -> None:
        """The TLS layer aborts (the application did, or a verification callback failed it): this side ends it."""
        if not self._lost:
            self._closed_by(self.outbound)
            self.disconnecting = True
            self.pipe.abortConnection()

    def _tls_closed(self) -> None:
        """The TLS layer is done: after close_notify both ways, a peer's alert, or a local TLS error.

        Who ended the connection: whoever the application said (already recorded), else the peer when OpenSSL
        saw its close_notify or fatal alert (RECEIVED_SHUTDOWN), else this side's TLS layer gave up.
        """
        if self._lost:
            return
        handle = self.getHandle()
        received = handle is not None and bool(handle.get_shutdown() & SSL.RECEIVED_SHUTDOWN)
        self._closed_by(other(self.outbound) if received else self.outbound)
        self.disconnecting = True
        self.pipe.loseConnection()

    def _pipe_call(self, name: str, *args: Any) -> None:
        method = getattr(self.pipe, name, None)
        if method is None:
            raise HarnessError(f"this carrier's pipe has no {name}()")
        method(*args)
