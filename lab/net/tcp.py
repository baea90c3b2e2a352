"""The TCP carrier: real TCP to a target outside the lab (``smtplab run --target``, ``smtplab probe HOST:PORT``).

The loopback carrier's machinery with real addresses: a connection goes to the address it names (IPv4 or IPv6),
from the source the caller binds (or the one the kernel picks), and its bytes are recorded below TLS on the
client side as on every carrier. A middlebox chain cannot run inside a connection the lab does not own end to
end, so ``connect`` with middleboxes starts a relay (``lab.net.relay.MiddleboxRelay``) on the path and
connects through it; the client still sees the target's address, as behind a transparent firewall.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from zope.interface import implementer

from lab.errors import BadInput
from lab.net.capture import Capture
from lab.net.carrier import ICarrier
from lab.net.loopback import LoopbackNetwork
from lab.net.middlebox import Middlebox
from lab.net.relay import MiddleboxRelay


@implementer(ICarrier)
class TCPCarrier(LoopbackNetwork):
    """Connect to real addresses; ``listen`` serves on a real address too."""

    name = "tcp"

    def __init__(self, *, capture: Capture | None = None, reactor: Any = None, connect_timeout: float = 30.0) -> None:
        super().__init__({}, capture=capture, reactor=reactor, allow_localhost=True, connect_timeout=connect_timeout)
        self._relays: dict[tuple[str, int], MiddleboxRelay] = {}

    def _address(self, ip: str, field: str) -> str:
        try:
            return str(ipaddress.ip_address(str(ip).strip("[]")))
        except ValueError:
            raise BadInput(f"not an IP address: {ip!r}", field=field) from None

    def loopback_of(self, virtual_ip: str, field: str = "ip") -> str:
        """The real address to use: the address itself, or the relay's that stands in front of it."""
        ip = self._address(virtual_ip, field)
        return self.mapping.get(ip, ip)

    def listen(self, ip: str, port: int, factory: Any, backlog: int = 50) -> Any:
        """Serve on the real ``ip:port`` (no virtual ports here)."""
        self.port_map.setdefault(port, port)
        return super().listen(ip, port, factory, backlog)

    def _place_middleboxes(self, dst_ip: str, dst_port: int, middleboxes: Sequence[Middlebox]) -> Sequence[Middlebox]:
        """A chain runs in a relay in front of the target (started on first use); the connection then goes to the
        relay and runs none itself."""
        if middleboxes:
            self._relay(self._address(dst_ip, "dst_ip"), dst_port, middleboxes)
        return ()

    def place_relay(self, host: str, port: int, middleboxes: Sequence[Middlebox]) -> None:
        """Put a relay running ``middleboxes`` in front of ``host:port`` (a receiver this carrier serves, for a
        sender outside the lab, ``lab.sender.external``); ``ports`` then names the relay's address."""
        self._relay(self._address(host, "host"), port, middleboxes)

    def _relay(self, host: str, port: int, middleboxes: Sequence[Middlebox]) -> None:
        """Point ``host:port`` at a relay that runs ``middleboxes`` (one per target, started on first use)."""
        if (host, port) in self._relays:
            return
        relay = MiddleboxRelay(host, port, middleboxes, reactor=self.reactor, connect_timeout=self.connect_timeout)
        relay_host, relay_port = relay.start()
        self._relays[(host, port)] = relay
        self.mapping[host] = relay_host
        self._virtual[relay_host] = host
        self.ports[(host, port)] = (relay_host, relay_port)

    def notes(self) -> list[str]:
        return [note for relay in self._relays.values() for note in relay.notes]

    def close(self, abort: bool = True) -> defer.Deferred[Any]:
        """Stop the relays (aborting what they still carry) and listening; ``abort`` as the loopback carrier."""
        stops = [relay.stop() for relay in self._relays.values()]
        self._relays.clear()
        return defer.gatherResults([*stops, super().close(abort)])
