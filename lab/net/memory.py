"""The in-memory carrier: TCP-like links between virtual addresses, driven by a virtual clock.

No socket, no reactor: every byte, SYN and FIN is a ``clock.callLater(latency, ...)``, so a run is a pure
function of its inputs and the same run gives the same plaintext bytes at the same virtual times. TLS is real
(``SessionTransport``); only the wire is simulated.

Model, kept deliberately small:

- connect at t: the SYN reaches the listener at t+L; the server protocol is connected then, the client at t+2L
  (when the SYN-ACK is back), and the ``connect`` Deferred fires with the client protocol. Nothing listening:
  the Deferred fails with Twisted's ``ConnectionRefusedError`` at t+2L and the flow is marked ``refused``.
- listen backlog: SYNs wait in the listener's accept queue until the accept pass that runs at the same virtual
  instant (``callLater(0)``), after every SYN due at that instant. A SYN that finds ``backlog`` connections
  already waiting is refused. So more than ``backlog`` connections arriving at one instant get refused; spread
  over time they are all accepted and the listener decides (e.g. 421 on max concurrency).
- a factory whose ``buildProtocol`` returns None: the server closes at once (the client sees connect, then EOF).
- ``loseConnection``: the closer's protocol is told at once (``callLater(0)``), the peer after the bytes still in
  flight (ConnectionDone). ``abortConnection``: ConnectionAborted here, ConnectionLost (a reset) at the peer.
  Bytes arriving at an end that has closed are dropped.
- exceptions raised by a protocol propagate out of ``run``/``run_until``: a bug in the lab is a harness error
  here, where a real reactor would log it and drop the connection.

The capture is recorded on the client side (``SessionTransport`` of the client, above any middlebox).
"""

from __future__ import annotations

import ipaddress
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, error, task
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IProtocol, ITransport
from twisted.internet.protocol import ClientFactory, ServerFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from lab.errors import BadInput, HarnessError
from lab.net.capture import Capture, Direction, Endpoint, Flow
from lab.net.carrier import CarrierTimeout, ICarrier
from lab.net.middlebox import Middlebox, MiddleboxPipe
from lab.net.transport import SessionTransport

__all__ = ["CarrierTimeout", "MemoryNetwork", "MemoryPort", "check_ip", "check_port"]

FIRST_SOURCE_PORT = 40000
MAX_STEPS = 100_000
WILDCARD = "0.0.0.0"


def check_ip(ip: str, field: str) -> str:
    try:
        return str(ipaddress.IPv4Address(ip))
    except (ValueError, TypeError):
        raise BadInput(f"not an IPv4 address: {ip!r}", field=field) from None


def check_port(port: int, field: str, *, zero: bool = False) -> int:
    if not isinstance(port, int) or isinstance(port, bool) or not ((0 if zero else 1) <= port <= 65535):
        raise BadInput(f"not a TCP port: {port!r}", field=field)
    return port


@implementer(ITransport)
class _End:
    """One end of a memory link: the raw pipe its protocol (a SessionTransport or a MiddleboxPipe) writes to."""

    def __init__(self, net: MemoryNetwork, host: IPv4Address, peer: IPv4Address) -> None:
        self.net = net
        self.host, self.peer_addr = host, peer
        self.other: _End | None = None
        self.protocol: IProtocol | None = None
        self.disconnecting = False
        self.closed = False
        self.producer: Any = None

    def attach(self, protocol: IProtocol) -> None:
        self.protocol = protocol
        protocol.makeConnection(self)

    def write(self, data: bytes) -> None:
        if self.disconnecting or self.closed or not data:
            return
        assert self.other is not None
        self.net.clock.callLater(self.net.latency, self.other._receive, bytes(data))

    def writeSequence(self, seq: Iterable[bytes]) -> None:
        self.write(b"".join(seq))

    def loseConnection(self) -> None:
        if self.disconnecting or self.closed:
            return
        self._close(error.ConnectionDone, error.ConnectionDone)

    def abortConnection(self) -> None:
        if self.closed:
            return
        self._close(error.ConnectionAborted, error.ConnectionLost)

    def _close(self, here: type[Exception], there: type[Exception]) -> None:
        self.disconnecting = True
        assert self.other is not None
        self.net.clock.callLater(self.net.latency, self.other._lost, there)
        self.net.clock.callLater(0, self._lost, here)

    def _receive(self, data: bytes) -> None:
        if self.closed or self.disconnecting or self.protocol is None:
            return
        self.protocol.dataReceived(data)

    def _lost(self, why: type[Exception]) -> None:
        if self.closed:
            return
        self.closed = self.disconnecting = True
        if self.producer is not None:
            producer, self.producer = self.producer, None
            producer.stopProducing()
        if self.protocol is not None:
            self.protocol.connectionLost(Failure(why()))

    def getPeer(self) -> IPv4Address:
        return self.peer_addr

    def getHost(self) -> IPv4Address:
        return self.host

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """Streaming producers only: the memory wire never fills up, so they are never paused."""
        if not streaming:
            raise HarnessError("the memory carrier takes streaming (push) producers only")
        if self.producer is not None:
            raise RuntimeError("a producer is already registered")
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None


@dataclass
class _Listening:
    ip: str
    port: int
    factory: ServerFactory
    backlog: int
    queue: list[_Syn] = field(default_factory=list)
    accept_scheduled: bool = False


@dataclass
class _Syn:
    flow: Flow
    client: IPv4Address
    server: IPv4Address
    factory: ClientFactory
    middleboxes: Sequence[Middlebox]
    deferred: defer.Deferred[Any]


class MemoryPort:
    """What ``listen`` returns, like a Twisted listening port."""

    def __init__(self, net: MemoryNetwork, listening: _Listening) -> None:
        self.net, self._listening = net, listening

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", self._listening.ip, self._listening.port)

    def stopListening(self) -> defer.Deferred[None]:
        key = (self._listening.ip, self._listening.port)
        if self.net._listeners.get(key) is self._listening:
            del self.net._listeners[key]
            self._listening.factory.doStop()
        return defer.succeed(None)


@implementer(ICarrier)
class MemoryNetwork:
    """Listen and connect on virtual addresses; ``run``/``run_until`` move the virtual clock."""

    name = "memory"

    def __init__(self, clock: task.Clock | None = None, capture: Capture | None = None, latency: float = 0.0005):
        if latency < 0:
            raise BadInput(f"latency must not be negative: {latency}", field="latency")
        self.clock = clock if clock is not None else task.Clock()
        self.capture = capture if capture is not None else Capture()
        self.latency = latency
        self._listeners: dict[tuple[str, int], _Listening] = {}
        self._ports: list[MemoryPort] = []
        self._ends: weakref.WeakSet[_End] = weakref.WeakSet()
        self._next_port = FIRST_SOURCE_PORT

    # -- listen / connect

    def listen(self, ip: str, port: int, factory: ServerFactory, backlog: int = 50) -> MemoryPort:
        ip, port = check_ip(ip, "ip"), check_port(port, "port")
        if backlog < 1:
            raise BadInput(f"backlog must be at least 1: {backlog}", field="backlog")
        if (ip, port) in self._listeners:
            raise error.CannotListenError(ip, port, OSError("address already in use"))
        listening = _Listening(ip, port, factory, backlog)
        self._listeners[(ip, port)] = listening
        factory.doStart()
        port_object = MemoryPort(self, listening)
        self._ports.append(port_object)
        return port_object

    def connect(
        self,
        src_ip: str | None,
        dst_ip: str,
        dst_port: int,
        factory: ClientFactory,
        *,
        src_port: int | None = None,
        middleboxes: Sequence[Middlebox] = (),
    ) -> defer.Deferred[Any]:
        """A Deferred that fires with the client protocol once connected, or fails with ConnectionRefusedError."""
        if src_ip is None:
            raise HarnessError("the memory carrier needs the client's virtual address")
        src_ip, dst_ip = check_ip(src_ip, "src_ip"), check_ip(dst_ip, "dst_ip")
        dst_port = check_port(dst_port, "dst_port")
        if src_port is None:
            src_port, self._next_port = self._next_port, self._next_port + 1
        src_port = check_port(src_port, "src_port")
        client = IPv4Address("TCP", src_ip, src_port)
        server = IPv4Address("TCP", dst_ip, dst_port)
        flow = self.capture.open(Endpoint(src_ip, src_port), Endpoint(dst_ip, dst_port), self.clock.seconds())
        d: defer.Deferred[Any] = defer.Deferred()
        self.clock.callLater(self.latency, self._syn, _Syn(flow, client, server, factory, middleboxes, d))
        return d

    def _syn(self, syn: _Syn) -> None:
        listening = self._listeners.get((syn.server.host, syn.server.port)) or self._listeners.get(
            (WILDCARD, syn.server.port)
        )
        if listening is None or len(listening.queue) >= listening.backlog:
            self._refuse(syn)
            return
        listening.queue.append(syn)
        if not listening.accept_scheduled:
            listening.accept_scheduled = True
            self.clock.callLater(0, self._accept_all, listening)

    def _refuse(self, syn: _Syn) -> None:
        syn.flow.refused = True
        syn.flow.close(Direction.S2C, self.clock.seconds())
        reason = error.ConnectionRefusedError(f"{syn.server.host}:{syn.server.port}")
        self.clock.callLater(self.latency, syn.deferred.errback, Failure(reason))

    def _accept_all(self, listening: _Listening) -> None:
        listening.accept_scheduled = False
        queue, listening.queue = listening.queue, []
        for syn in queue:
            self._accept(listening, syn)

    def _accept(self, listening: _Listening, syn: _Syn) -> None:
        server_end = _End(self, syn.server, syn.client)
        client_end = _End(self, syn.client, syn.server)
        server_end.other, client_end.other = client_end, server_end
        self._ends.add(server_end)
        self._ends.add(client_end)
        # the client learns of the connection one latency later; scheduled first so it precedes the banner
        self.clock.callLater(self.latency, self._client_connected, syn, client_end)
        app = listening.factory.buildProtocol(syn.client)
        if app is None:
            server_end.loseConnection()
            return
        session = SessionTransport(
            app, host=syn.server, peer=syn.client, is_client=False, clock=self.clock, flow=syn.flow, record=False
        )
        server_end.attach(session)

    def _client_connected(self, syn: _Syn, end: _End) -> None:
        app = syn.factory.buildProtocol(syn.server)
        if app is None:
            end.abortConnection()
            syn.deferred.errback(Failure(HarnessError("the client factory built no protocol")))
            return
        session = SessionTransport(
            app, host=syn.client, peer=syn.server, is_client=True, clock=self.clock, flow=syn.flow, record=True
        )
        end.attach(MiddleboxPipe(session, syn.middleboxes, self.clock) if syn.middleboxes else session)
        syn.deferred.callback(app)

    # -- driving the clock

    def _step(self) -> bool:
        """Run everything due at the next scheduled instant; False when nothing is scheduled."""
        calls = self.clock.getDelayedCalls()
        if not calls:
            return False
        due = min(call.getTime() for call in calls)
        self.clock.advance(max(0.0, due - self.clock.seconds()))
        return True

    def run(self, until_idle: bool = True, max_steps: int = MAX_STEPS) -> None:
        """Advance the clock until nothing is scheduled (or, with ``until_idle=False``, run what is due now)."""
        if not until_idle:
            self.clock.advance(0)
            return
        for _ in range(max_steps):
            if not self._step():
                return
        raise HarnessError(f"the memory network did not go idle within {max_steps} steps")

    def pump(self, max_steps: int = MAX_STEPS) -> None:
        self.run(until_idle=True, max_steps=max_steps)

    def run_until(self, d: defer.Deferred[Any], timeout: float = 60.0, max_steps: int = MAX_STEPS) -> Any:
        """Advance virtual time until ``d`` fires; return its result or raise its error.

        Raises CarrierTimeout when ``timeout`` virtual seconds pass first, or when nothing is left to run.
        """
        results: list[Any] = []
        d.addBoth(results.append)
        deadline = self.clock.seconds() + timeout
        for _ in range(max_steps):
            if results:
                break
            calls = self.clock.getDelayedCalls()
            if not calls:
                raise CarrierTimeout("nothing left to run and the awaited event did not happen")
            due = min(call.getTime() for call in calls)
            if due > deadline:
                self.clock.advance(max(0.0, deadline - self.clock.seconds()))
                raise CarrierTimeout(f"the awaited event did not happen within {timeout} virtual seconds")
            self.clock.advance(max(0.0, due - self.clock.seconds()))
        if not results:
            raise HarnessError(f"run_until: gave up after {max_steps} steps")
        result = results[0]
        if isinstance(result, Failure):
            result.raiseException()
        return result

    def wait(self, d: defer.Deferred[Any], timeout: float = 60.0) -> defer.Deferred[Any]:
        """``run_until`` as a Deferred, for code written once for every carrier (LoopbackNetwork.wait)."""
        try:
            return defer.succeed(self.run_until(d, timeout))
        except Exception:
            return defer.fail()

    def drain(self) -> None:
        """Run the clock until nothing is scheduled: the listener finishes closing (its log lines)."""
        self.run()

    def notes(self) -> list[str]:
        return []

    def close(self, abort: bool = True) -> defer.Deferred[Any]:
        """Stop listening; with ``abort``, connections still open are aborted at once (both ends told)."""
        for port in self._ports:
            port.stopListening()
        self._ports.clear()
        if abort:
            for end in list(self._ends):
                end.abortConnection()
            self._ends.clear()
        return defer.succeed(None)
