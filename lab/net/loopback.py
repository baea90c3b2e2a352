"""The loopback carrier: the memory carrier's API over real TCP sockets on 127.x.y.z, on the real reactor.

Each virtual host is given its own loopback address (``mapping``: virtual IP -> 127.x.y.z; 127.0.0.1 only when
``allow_localhost`` says the user chose it). Protocols still see only virtual addresses: ``getHost``/``getPeer``
are translated back through the mapping, and the listening port shows its virtual number (e.g. 25) whatever
real port it is bound to. Virtual ports map to real ports through ``port_map``; a port not in it is bound
ephemeral (port 25 needs root and may be taken) and the choice is kept in ``ports``.

TLS is not the TCP transport's own: every connection's protocol is a ``SessionTransport`` (with the TCP
transport as its raw pipe), so bytes are recorded below TLS here too, with timestamps in seconds since the
network was made. A connection between two ends of this network is recorded once, on the client side (above
any middlebox, as on the memory carrier); a connection from outside (swaks, a real MTA) on the server side.
"""

from __future__ import annotations

import ipaddress
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet import defer, error
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import ClientFactory, Factory, ServerFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from lab.errors import BadInput, HarnessError
from lab.net.capture import Capture, Direction, Endpoint, Flow
from lab.net.carrier import ICarrier, drive, wait_on
from lab.net.memory import check_ip, check_port
from lab.net.middlebox import Middlebox, MiddleboxPipe
from lab.net.transport import SessionTransport

LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")
LOCALHOST = "127.0.0.1"
DRAIN_POLL = 0.001  # seconds between looks at the connections still open while draining


class LoopbackPort:
    """What ``listen`` returns: the Twisted port, with its virtual and real addresses."""

    def __init__(self, virtual: IPv4Address, real: IPv4Address, port: Any) -> None:
        self.virtual, self.real, self._port = virtual, real, port

    def getHost(self) -> IPv4Address:
        return self.virtual

    def stopListening(self) -> defer.Deferred[None]:
        return defer.maybeDeferred(self._port.stopListening)


class _ServerSide(Factory):
    """Wraps the listener's factory: each accepted TCP connection gets a SessionTransport with virtual addresses."""

    def __init__(self, net: LoopbackNetwork, wrapped: ServerFactory, host: IPv4Address) -> None:
        self.net, self.wrapped, self.host = net, wrapped, host

    def doStart(self) -> None:
        self.wrapped.doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()

    def buildProtocol(self, addr: IPv4Address) -> SessionTransport | None:  # type: ignore[override]  # TCP: IPv4
        peer = IPv4Address("TCP", self.net.virtual_of(addr.host), addr.port)
        app = self.wrapped.buildProtocol(peer)
        if app is None:
            return None
        flow = self.net._own.pop((addr.host, addr.port), None)
        record = flow is None  # a client of this network records its own flow
        if flow is None:
            flow = self.net.capture.open(
                Endpoint(peer.host, peer.port), Endpoint(self.host.host, self.host.port), self.net.now()
            )
        session = SessionTransport(
            app,
            host=self.host,
            peer=peer,
            is_client=False,
            clock=self.net.reactor,
            flow=flow,
            record=record,
            epoch=self.net.epoch,
        )
        self.net._sessions.add(session)
        return session


class _ClientSide(ClientFactory):
    """Wraps the client's factory for one connect; fires the connect Deferred with the application protocol."""

    def __init__(
        self,
        net: LoopbackNetwork,
        wrapped: ClientFactory,
        deferred: defer.Deferred[Any],
        host_ip: str,
        peer: IPv4Address,
        middleboxes: Sequence[Middlebox],
    ) -> None:
        self.net, self.wrapped, self.deferred = net, wrapped, deferred
        self.host_ip, self.peer, self.middleboxes = host_ip, peer, middleboxes
        self.flow: Flow | None = None
        self.own_key: tuple[str, int] | None = None

    def buildProtocol(self, addr: IAddress | None) -> Any:
        assert self.flow is not None
        app = self.wrapped.buildProtocol(self.peer)
        if app is None:
            self._fail(Failure(HarnessError("the client factory built no protocol")))
            return None
        session = SessionTransport(
            app,
            host=IPv4Address("TCP", self.host_ip, self.flow.client.port),
            peer=self.peer,
            is_client=True,
            clock=self.net.reactor,
            flow=self.flow,
            record=True,
            epoch=self.net.epoch,
        )
        self.net._sessions.add(session)
        self.net.reactor.callLater(0, self._connected, app)
        return MiddleboxPipe(session, self.middleboxes, self.net.reactor) if self.middleboxes else session

    def _connected(self, app: Any) -> None:
        if not self.deferred.called:
            self.deferred.callback(app)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if self.flow is not None:
            if reason.check(error.ConnectionRefusedError):
                self.flow.refused = True
            self.flow.close(Direction.S2C, self.net.now())
        self._fail(reason)

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        self.net._own.pop(self.own_key or ("", 0), None)

    def _fail(self, reason: Failure) -> None:
        self.net._own.pop(self.own_key or ("", 0), None)
        if not self.deferred.called:
            self.deferred.errback(reason)


@implementer(ICarrier)
class LoopbackNetwork:
    """``listen``/``connect`` on virtual addresses, carried by real TCP on their 127.x.y.z addresses."""

    name = "loopback"

    def __init__(
        self,
        mapping: Mapping[str, str],
        *,
        port_map: Mapping[int, int] | None = None,
        capture: Capture | None = None,
        reactor: Any = None,  # IReactorTCP and IReactorTime, which one annotation cannot say
        allow_localhost: bool = False,
        connect_timeout: float = 30.0,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.mapping = self._check_mapping(mapping, allow_localhost)
        self._virtual = {lo: virtual for virtual, lo in self.mapping.items()}
        self.port_map = {
            check_port(v, "port_map"): check_port(r, "port_map", zero=True) for v, r in (port_map or {}).items()
        }
        self.capture = capture if capture is not None else Capture()
        self.connect_timeout = connect_timeout
        self.epoch: float = reactor.seconds()
        self.ports: dict[tuple[str, int], tuple[str, int]] = {}  # virtual (ip, port) -> real (ip, port) listening
        self._listening: list[LoopbackPort] = []
        self._own: dict[tuple[str, int], Flow] = {}  # real (ip, port) of this network's clients -> their flow
        self._sessions: weakref.WeakSet[SessionTransport] = weakref.WeakSet()

    @staticmethod
    def _check_mapping(mapping: Mapping[str, str], allow_localhost: bool) -> dict[str, str]:
        checked: dict[str, str] = {}
        for virtual, lo in mapping.items():
            virtual, lo = check_ip(virtual, "mapping"), check_ip(lo, f"mapping.{virtual}")
            if ipaddress.IPv4Address(lo) not in LOOPBACK:
                raise BadInput(f"{virtual} is mapped to {lo}, which is not in 127.0.0.0/8", field=f"mapping.{virtual}")
            if lo == LOCALHOST and not allow_localhost:
                raise BadInput(
                    f"{virtual} is mapped to {LOCALHOST}; give each host its own 127.x.y.z (or allow localhost)",
                    field=f"mapping.{virtual}",
                )
            if lo in checked.values():
                raise BadInput(f"two virtual hosts share the loopback address {lo}", field=f"mapping.{virtual}")
            checked[virtual] = lo
        return checked

    def loopback_of(self, virtual_ip: str, field: str = "ip") -> str:
        ip = check_ip(virtual_ip, field)
        try:
            return self.mapping[ip]
        except KeyError:
            raise BadInput(f"{ip} has no loopback address in the mapping", field=field) from None

    def virtual_of(self, loopback_ip: str) -> str:
        """The virtual address of a loopback one; an unmapped (outside) peer keeps its real address."""
        return self._virtual.get(loopback_ip, loopback_ip)

    def now(self) -> float:
        return float(self.reactor.seconds()) - self.epoch

    @property
    def clock(self) -> Any:
        """The reactor: this carrier's clock is the wall clock."""
        return self.reactor

    def _address(self, ip: str, field: str) -> str:
        """An address a client may connect from or to (the TCP carrier takes IPv6 too)."""
        return check_ip(ip, field)

    # -- listen / connect

    def listen(self, ip: str, port: int, factory: ServerFactory, backlog: int = 50) -> LoopbackPort:
        lo, port = self.loopback_of(ip), check_port(port, "port")
        virtual = IPv4Address("TCP", check_ip(ip, "ip"), port)
        real_port = self.port_map.get(port, 0)
        tcp = self.reactor.listenTCP(real_port, _ServerSide(self, factory, virtual), backlog=backlog, interface=lo)
        real = tcp.getHost()
        self.ports[(virtual.host, port)] = (lo, real.port)
        listening = LoopbackPort(virtual, IPv4Address("TCP", lo, real.port), tcp)
        self._listening.append(listening)
        return listening

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
        """A Deferred firing with the client protocol once connected, or failing (ConnectionRefusedError...).

        ``src_ip`` None: the kernel picks the source address (only the TCP carrier allows that).
        """
        if src_ip is None and src_port is not None:
            raise HarnessError("a source port needs a source address")
        middleboxes = self._place_middleboxes(dst_ip, dst_port, middleboxes)
        lo_src = self.loopback_of(src_ip, "src_ip") if src_ip is not None else None
        lo_dst = self.loopback_of(dst_ip, "dst_ip")
        src_ip = self._address(src_ip, "src_ip") if src_ip is not None else None
        dst_ip = self._address(dst_ip, "dst_ip")
        dst_port = check_port(dst_port, "dst_port")
        real_port = self.ports.get((dst_ip, dst_port), (lo_dst, self.port_map.get(dst_port, dst_port)))[1]
        connector: Any = None

        def cancel(_: defer.Deferred[Any]) -> None:
            try:
                connector.stopConnecting()
            except error.NotConnectingError:
                connector.disconnect()

        d: defer.Deferred[Any] = defer.Deferred(cancel)
        peer = IPv4Address("TCP", dst_ip, dst_port)
        side = _ClientSide(self, factory, d, src_ip or "", peer, middleboxes)
        bind = None if lo_src is None else (lo_src, check_port(src_port, "src_port") if src_port is not None else 0)
        connector = self.reactor.connectTCP(lo_dst, real_port, side, timeout=self.connect_timeout, bindAddress=bind)
        local_ip, local_port = self._bound(connector)
        if src_ip is None:
            src_ip = side.host_ip = self.virtual_of(local_ip)
        side.flow = self.capture.open(Endpoint(src_ip, local_port), Endpoint(dst_ip, dst_port), self.now())
        side.own_key = (lo_src or local_ip, local_port)
        self._own[side.own_key] = side.flow
        return d

    def _place_middleboxes(self, dst_ip: str, dst_port: int, middleboxes: Sequence[Middlebox]) -> Sequence[Middlebox]:
        """The chain the client's connection runs itself: all of it here, where the lab owns both ends (the TCP
        carrier runs it in a relay instead)."""
        return middleboxes

    @staticmethod
    def _bound(connector: Any) -> tuple[str, int]:
        """The client socket is bound inside connectTCP, before the reactor runs: its address is known already."""
        try:
            host = connector.transport.getHost()
            return str(host.host), int(host.port)
        except (AttributeError, OSError):
            return "", 0

    # -- waiting

    def wait(self, d: defer.Deferred[Any], timeout: float = 30.0) -> defer.Deferred[Any]:
        """``d``'s result, or a CarrierTimeout after ``timeout`` wall-clock seconds; for a running reactor."""
        return wait_on(self.reactor, d, timeout)

    def run_until(self, d: defer.Deferred[Any], timeout: float = 30.0) -> Any:
        """Drive the (not running) reactor until ``d`` fires or ``timeout`` wall-clock seconds pass
        (``lab.net.carrier.drive``). For synchronous callers such as a command-line run; inside a running reactor
        use ``wait``."""
        return drive(self.reactor, d, timeout)

    def drain(self, timeout: float = 1.0) -> None:
        """Run the reactor until every connection of this network has closed (the listener's closing log lines
        are in), or ``timeout`` wall-clock seconds; a peer that keeps its end open is left as it is."""
        done: defer.Deferred[None] = defer.Deferred()
        deadline = self.reactor.seconds() + timeout

        def check() -> None:
            if not any(session.connected for session in self._sessions) or self.reactor.seconds() >= deadline:
                done.callback(None)
            else:
                self.reactor.callLater(DRAIN_POLL, check)

        check()
        self.run_until(done, timeout + 1)

    def notes(self) -> list[str]:
        return []

    def close(self, abort: bool = True) -> defer.Deferred[Any]:
        """Stop listening; with ``abort`` also abort connections still open: leaves the reactor clean."""
        if abort:
            for session in list(self._sessions):
                if session.connected:
                    session.abortConnection()
            self._sessions.clear()
        stops = [port.stopListening() for port in self._listening]
        self._listening.clear()
        return defer.gatherResults(stops)
