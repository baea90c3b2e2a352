"""The netns carrier: the loopback carrier's machinery with the topology's own addresses, each socket in its
host's network namespace (lab.net.netns), so every byte crosses veth links and the forwarding firewall.

There is no address mapping and no port mapping: a listener binds its host's address and its own port (25 is
25) inside its host's namespace, a client binds its host's address inside its own, and the kernel routes the
connection hop by hop. The lab's hosts stay in this one process: ``listen`` and ``connect`` switch the thread
into the host's namespace while Twisted creates the socket (docs/architecture.md says why not a process per
host).

A middlebox on the path runs where a firewall would: in the namespace of the first forwarding host between
client and server, as a transparent relay (``NetnsRelay``). Two policy-routing rules there, added for the run
and removed after it, deliver the client's packets to the server's address and the server's answers to the
client's address to the firewall's own sockets (the TPROXY arrangement, without iptables): the relay listens
on the server's address and port, and connects onward from the client's own address and port, so neither end
sees anything but the other. Without a forwarding host on the path the chain runs in the client's connection,
as on the loopback carrier.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet import defer, tcp
from twisted.internet.protocol import ClientFactory, Factory
from zope.interface import implementer

from lab.errors import HarnessError
from lab.net import netns
from lab.net.capture import Capture
from lab.net.carrier import ICarrier
from lab.net.loopback import LoopbackNetwork
from lab.net.middlebox import Middlebox
from lab.net.relay import MiddleboxRelay, _Splice
from lab.net.topology import Topology

IP_TRANSPARENT = 19  # <linux/in.h>: bind and accept addresses that are not the host's own (socket module lacks it)
IPV6_TRANSPARENT = 75  # <linux/in6.h>: the same for IPv6


def _transparent(sock: socket.socket) -> socket.socket:
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return sock


class _TransparentPort(tcp.Port):
    def createInternetSocket(self) -> socket.socket:
        return _transparent(super().createInternetSocket())  # type: ignore[no-untyped-call]


class _TransparentClient(tcp.Client):
    def createInternetSocket(self) -> socket.socket:
        return _transparent(super().createInternetSocket())  # type: ignore[no-untyped-call]


class _TransparentConnector(tcp.Connector):
    def _makeTransport(self) -> tcp.Client:
        return _TransparentClient(self.host, self.port, self.bindAddress, self, self.reactor)  # type: ignore[no-untyped-call]


class NetnsRelay(MiddleboxRelay):
    """A middlebox relay inside a firewall's namespace, listening on the server's own address and port and
    connecting onward from the client's own address and port (both IP_TRANSPARENT)."""

    def __init__(
        self,
        namespace: str,
        target_host: str,
        target_port: int,
        middleboxes: Sequence[Middlebox],
        *,
        reactor: Any,
        connect_timeout: float,
    ) -> None:
        super().__init__(
            target_host, target_port, middleboxes, reactor=reactor, address=target_host, connect_timeout=connect_timeout
        )
        self.namespace = namespace

    def listen(self, factory: Factory) -> Any:
        with netns.inside(self.namespace):
            port = _TransparentPort(self.target_port, factory, 50, self.target_host, self.reactor)
            port.startListening()
        return port

    def connect_target(self, splice: _Splice, factory: ClientFactory) -> Any:
        peer = splice.client.transport.getPeer()
        with netns.inside(self.namespace):
            connector = _TransparentConnector(
                self.target_host, self.target_port, factory, self.connect_timeout, (peer.host, peer.port), self.reactor
            )
            connector.connect()
        return connector


@implementer(ICarrier)
class NetnsNetwork(LoopbackNetwork):
    """``listen``/``connect`` on the topology's addresses, each socket in its host's namespace (``kept``: in the
    kept set, where a real MTA may serve, docs/netns.md)."""

    name = "netns"

    def __init__(
        self,
        topology: Topology,
        *,
        capture: Capture | None = None,
        reactor: Any = None,
        connect_timeout: float = 30.0,
        kept: bool = False,
    ) -> None:
        self.namespaces = netns.namespaces_for(topology, kept)
        addresses = {a: a for host in topology.hosts for a in host.addresses}
        super().__init__(addresses, capture=capture, reactor=reactor, connect_timeout=connect_timeout)
        self._relays: dict[tuple[str, str, int], NetnsRelay] = {}
        self._rules: dict[str, list[str]] = {}  # namespace -> the intercept rules this carrier added there

    @staticmethod
    def _check_mapping(mapping: Mapping[str, str], allow_localhost: bool) -> dict[str, str]:
        """The topology's own addresses, each its own: nothing to check against 127/8."""
        return dict(mapping)

    def listen(self, ip: str, port: int, factory: Any, backlog: int = 50) -> Any:
        """Serve on ``ip:port`` itself, inside the namespace of the host that has ``ip``."""
        self.port_map.setdefault(port, port)
        with netns.inside(self.namespaces.namespace_of(self.loopback_of(ip))):
            return super().listen(ip, port, factory, backlog)

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
        """Connect from inside the client's namespace; a middlebox chain goes into a relay on the path."""
        if src_ip is None:
            raise HarnessError("the netns carrier connects from a host of the topology: give a source address")
        if middleboxes:
            middleboxes = self._intercept(self.loopback_of(src_ip), self.loopback_of(dst_ip), dst_port, middleboxes)
        with netns.inside(self.namespaces.namespace_of(self.loopback_of(src_ip, "src_ip"))):
            return super().connect(src_ip, dst_ip, dst_port, factory, src_port=src_port, middleboxes=middleboxes)

    def _intercept(self, src: str, dst: str, port: int, middleboxes: Sequence[Middlebox]) -> Sequence[Middlebox]:
        """Start a relay for ``middleboxes`` at the first firewall from ``src`` to ``dst`` and divert this
        client's packets to it; the chain left for the client's own connection (all of it without a firewall)."""
        where = self.namespaces.interceptor(src, dst)
        if where is None:
            return middleboxes
        namespace, facing_client, facing_server = where
        if (namespace, dst, port) not in self._relays:
            relay = NetnsRelay(
                namespace, dst, port, middleboxes, reactor=self.reactor, connect_timeout=self.connect_timeout
            )
            relay.start()
            self._relays[(namespace, dst, port)] = relay
        table = netns.INTERCEPT_TABLE
        rules = [
            f"rule add iif {facing_client.dev} from {src} to {dst} ipproto tcp dport {port} lookup {table}",
            f"rule add iif {facing_server.dev} from {dst} to {src} ipproto tcp sport {port} lookup {table}",
        ]
        rules = [rule for rule in rules if rule not in self._rules.get(namespace, [])]
        netns.ip_batch(rules, namespace)
        self._rules.setdefault(namespace, []).extend(rules)
        return ()

    def notes(self) -> list[str]:
        return [note for relay in self._relays.values() for note in relay.notes]

    def close(self, abort: bool = True) -> defer.Deferred[Any]:
        """Stop the relays and remove their intercept rules, then as the loopback carrier."""
        stops = [relay.stop() for relay in self._relays.values()]
        self._relays.clear()
        rules, self._rules = self._rules, {}
        if not self.namespaces.closed:  # a removed namespace took its rules with it
            for namespace, added in rules.items():
                netns.ip_batch([rule.replace("rule add", "rule del", 1) for rule in added], namespace)
        return defer.gatherResults([*stops, super().close(abort)])
