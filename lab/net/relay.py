"""A loopback TCP relay that puts the lab's middleboxes in front of an external target (docs/conformance.md).

On the lab's own carriers a middlebox runs inside the client's connection (``MiddleboxPipe``). A real MTA at
HOST:PORT is outside the lab, so the relay stands on the path instead: it listens on a loopback address of its
own, opens one connection to the target for every connection it accepts, and passes the bytes each way through
the same ``MiddleboxChain`` (rewrite ``250-STARTTLS``, answer STARTTLS itself). Everything the boxes leave alone
is forwarded byte for byte; when either side closes, the relay closes the other after what it still had for it.

The relay holds no stream: at most a partial line per direction inside the boxes (``middlebox.MAX_HELD``) and
what sits in a transport's write buffer. When a write buffer passes its transport's ``bufferSize``, the relay
stops reading both sides (the other side feeds that buffer with forwarded bytes, the side itself with the boxes'
answers) and reads again once it drained; a side that does not read stalls its connection, nothing piles up.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer, error
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.python.failure import Failure

from lab.errors import HarnessError
from lab.names import is_loopback
from lab.net.capture import Direction
from lab.net.middlebox import Middlebox, MiddleboxChain

RELAY_ADDRESS = "127.254.0.1"  # the relay's own loopback address (RELAY_SPARE when the target has taken it)
RELAY_SPARE = "127.254.0.2"


class _WriteBuffer:
    """Registered as the producer of one end's transport: Twisted calls ``pauseProducing`` when that transport's
    write buffer passed its ``bufferSize`` and ``resumeProducing`` once it is empty again."""

    def __init__(self, splice: _Splice) -> None:
        self.splice = splice
        self.full = False

    def pauseProducing(self) -> None:
        self.full = True
        self.splice.balance()

    def resumeProducing(self) -> None:
        self.full = False
        self.splice.balance()

    def stopProducing(self) -> None:
        self.full = False


class _End(Protocol):
    """One TCP end of a relayed connection: the client's (accepted) or the target's (opened by the relay)."""

    transport: Any  # a TCP transport: a consumer of our writes, and a producer we pause and resume

    def __init__(self, splice: _Splice, direction: Direction) -> None:
        self.splice = splice
        self.direction = direction  # the direction of the bytes this end receives
        self.buffer = _WriteBuffer(splice)
        self.paused = False
        self.closed = False

    def connectionMade(self) -> None:
        self.transport.registerProducer(self.buffer, True)
        self.splice.made(self)

    def dataReceived(self, data: bytes) -> None:
        self.splice.received(self, data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed = True
        self.splice.lost(self)

    def write(self, data: bytes) -> None:
        if data and not self.closed:
            self.transport.write(data)

    def set_paused(self, paused: bool) -> None:
        if paused != self.paused and not self.closed:
            self.paused = paused
            (self.transport.pauseProducing if paused else self.transport.resumeProducing)()


class _Splice:
    """One relayed connection: the client's end, the end opened to the target, and the chain of boxes between."""

    def __init__(self, relay: MiddleboxRelay) -> None:
        self.relay = relay
        self.chain = MiddleboxChain.open(relay.middleboxes)
        self.client = _End(self, Direction.C2S)
        self.server: _End | None = None
        self.connector: Any = None
        self.done = False

    def made(self, end: _End) -> None:
        if end is self.client:  # not a byte is read from the client before the target answers the connect
            self.relay.splices.add(self)
            self.client.set_paused(True)
            self.connector = self.relay.connect_target(self, _TargetSide(self))
        self.balance()

    def balance(self) -> None:
        """Read a side only while the target is connected and neither write buffer is over its size."""
        server = self.server
        stalled = server is None or server.buffer.full or self.client.buffer.full
        self.client.set_paused(stalled)
        if server is not None:
            server.set_paused(stalled)

    def received(self, end: _End, data: bytes) -> None:
        if end is self.client:
            to_server, to_client = self.chain.from_client(data)
        else:
            to_server, to_client = self.chain.from_server(data)
        self._deliver(to_server, to_client)

    def lost(self, end: _End) -> None:
        """Either side closed: flush what the boxes held for the other side, then close it too."""
        if self.client.closed and (self.server is None or self.server.closed):
            self.relay.splices.discard(self)
        if self.done:
            return
        self.done = True
        if self.server is None:  # the client left before the target answered
            self._stop_connecting()
            return
        self._deliver(*self.chain.end(end.direction))
        other = self.server if end is self.client else self.client
        other.transport.loseConnection()

    def unreachable(self, reason: Failure) -> None:
        self.relay.notes.append(
            f"relay could not reach {self.relay.target_host}:{self.relay.target_port}: {reason.getErrorMessage()}"
        )
        self.done = True
        self.relay.splices.discard(self)
        self.client.transport.loseConnection()

    def abort(self) -> None:
        self._stop_connecting()
        for end in (self.client, self.server):
            if end is not None and not end.closed:
                end.transport.abortConnection()

    def _deliver(self, to_server: bytes, to_client: bytes) -> None:
        if self.server is not None:
            self.server.write(to_server)
        self.client.write(to_client)

    def _stop_connecting(self) -> None:
        if self.server is None and self.connector is not None:
            with contextlib.suppress(error.NotConnectingError):
                self.connector.stopConnecting()


class _TargetSide(ClientFactory):
    """The relay's connect to the target for one splice."""

    def __init__(self, splice: _Splice) -> None:
        self.splice = splice

    def buildProtocol(self, addr: Any) -> _End | None:
        if self.splice.done:  # the client went away while we were connecting
            return None
        self.splice.server = _End(self.splice, Direction.S2C)
        return self.splice.server

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if not self.splice.done:
            self.splice.unreachable(reason)


class _ClientSide(Factory):
    def __init__(self, relay: MiddleboxRelay) -> None:
        self.relay = relay

    def buildProtocol(self, addr: Any) -> _End:
        return _Splice(self.relay).client


class MiddleboxRelay:
    """Listens on ``address`` (an ephemeral port) and relays every connection to the target through ``middleboxes``.

    ``notes`` holds what the relay itself saw (a target it could not reach); the boxes keep their own notes.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        middleboxes: Sequence[Middlebox],
        *,
        reactor: Any = None,
        address: str | None = None,
        connect_timeout: float = 30.0,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.target_host, self.target_port = target_host, target_port
        self.middleboxes = list(middleboxes)
        self.address = address or (RELAY_ADDRESS if target_host != RELAY_ADDRESS else RELAY_SPARE)
        self.connect_timeout = connect_timeout
        # A loopback target sees the relay's own address; a remote one (allow_remote) whatever route reaches it.
        self.source = (self.address, 0) if is_loopback(target_host) else None
        self.notes: list[str] = []
        self.splices: set[_Splice] = set()
        self._port: Any = None

    def start(self) -> tuple[str, int]:
        """Start listening; the (address, port) to point the client at."""
        if self._port is None:
            try:
                self._port = self.listen(_ClientSide(self))
            except error.CannotListenError as exc:
                raise HarnessError(f"the relay cannot listen on {self.address}: {exc.socketError}") from None
        return self.address, int(self._port.getHost().port)

    def listen(self, factory: Factory) -> Any:
        """The relay's listening port (the netns carrier's relay listens transparently instead)."""
        return self.reactor.listenTCP(0, factory, interface=self.address)

    def connect_target(self, splice: _Splice, factory: ClientFactory) -> Any:
        """The connector of one splice's connection to the target (``splice.client`` is the accepted end)."""
        return self.reactor.connectTCP(
            self.target_host, self.target_port, factory, timeout=self.connect_timeout, bindAddress=self.source
        )

    def stop(self) -> defer.Deferred[None]:
        """Abort the connections still open and stop listening."""
        for splice in list(self.splices):
            splice.abort()
        self.splices.clear()
        port, self._port = self._port, None
        return defer.maybeDeferred(port.stopListening) if port is not None else defer.succeed(None)
