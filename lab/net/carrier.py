# mypy: disable-error-code="empty-body, misc, return-value"
# (zope.interface declarations: methods without ``self``, classes that provide ICarrier by ``@implementer``;
#  mypy reads them with the mypy-zope plugin, which the lint setup does not load yet)
"""The carrier seam: how bytes get from a client to a listener, hidden behind one interface.

A carrier offers one connect path (``connect``: a client protocol factory to a host's address and port, with a
middlebox chain on the path where the topology or the case puts one), one clock (``clock``, an
``IReactorTime`` that every wait of the run uses), and one way to drive it (``run_until``). TLS is not the
carrier's business: every carrier carries the same ``SessionTransport``, which layers TLS from the one client
factory (``lab.tls.tlsctx.ClientTLSFactory``) and records the bytes below it into ``capture``.

- ``memory`` (``lab.net.memory.MemoryNetwork``): in-process pipes, a virtual clock, no socket; the default.
- ``loopback`` (``lab.net.loopback.LoopbackNetwork``): real TCP between the topology's hosts on 127.x.y.z.
- ``netns`` (``lab.net.netns_carrier.NetnsNetwork``): real TCP between Linux network namespaces, one per host,
  on the topology's own addresses, through a forwarding firewall namespace (needs root; docs/netns.md).
- ``tcp`` (``lab.net.tcp.TCPCarrier``): real TCP to a target outside the lab; middleboxes stand in a relay.

A new carrier (a container) is one more class providing ``ICarrier`` and one more entry
in ``open_carrier``; the runner, the client engine and the probe do not change.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface

from lab.errors import HarnessError
from lab.net.capture import Capture

if TYPE_CHECKING:
    from lab.net.topology import Topology

#: The carriers that serve the lab's own listeners (``smtplab run --carrier``, ``--smtplab-carrier``).
LAB_CARRIERS = ("memory", "loopback", "netns")
#: The carrier to targets outside the lab (``--target``, ``smtplab probe HOST:PORT``).
EXTERNAL_CARRIER = "tcp"


class CarrierTimeout(HarnessError):
    """``run_until`` gave up: the awaited event did not happen within the (virtual or wall-clock) timeout."""


class ICarrier(Interface):
    """Listen and connect on a network's addresses; the protocols see only those addresses."""

    name = Attribute("what records call this carrier: memory, loopback, netns or tcp")
    clock = Attribute("the IReactorTime every wait of a run over this carrier uses")
    capture = Attribute("the lab.net.capture.Capture the connections' bytes are recorded into")

    def listen(ip: str, port: int, factory: Any, backlog: int = 50) -> Any:
        """Serve ``factory`` on ``ip:port``; returns a port with ``getHost()`` and ``stopListening()``."""

    def connect(
        src_ip: str | None,
        dst_ip: str,
        dst_port: int,
        factory: Any,
        *,
        src_port: int | None = None,
        middleboxes: Any = (),
    ) -> defer.Deferred[Any]:
        """Connect a client protocol factory from ``src_ip`` (None: any) to ``dst_ip:dst_port`` through
        ``middleboxes``; a Deferred firing with the client protocol, or failing (ConnectionRefusedError ...)."""

    def run_until(d: defer.Deferred[Any], timeout: float) -> Any:
        """Drive the carrier (its clock, its reactor) until ``d`` fires: its result, or raise its error;
        ``CarrierTimeout`` after ``timeout`` seconds of the carrier's clock. For synchronous callers."""

    def wait(d: defer.Deferred[Any], timeout: float) -> defer.Deferred[Any]:
        """``d``'s result as a Deferred, failing with ``CarrierTimeout`` after ``timeout``: for code already
        driven (a running reactor, a coroutine under ``run_until``)."""

    def drain() -> None:
        """Let what is under way finish by itself (the memory carrier runs its clock until idle)."""

    def notes() -> list[str]:
        """What the link itself saw (a relay that could not reach the target), as transcript notes."""

    def close(abort: bool = True) -> defer.Deferred[Any]:
        """Stop listening (and any relay); with ``abort`` also abort the connections still open."""


def drive(reactor: Any, d: defer.Deferred[Any], timeout: float) -> Any:
    """The one way the lab drives a real reactor for a synchronous caller: Twisted's own main-loop step
    (``runUntilCurrent`` then ``doIteration``, sleeping until the next timed call or I/O, never polling) until
    ``d`` fires; ``CarrierTimeout`` after ``timeout`` wall-clock seconds.

    Used by every run over loopback or TCP (``smtplab run``, ``-j`` workers, ``smtplab probe``). Inside a
    running reactor (pytest-twisted, ``smtplab serve``) use the carrier's ``wait`` instead.
    """
    if reactor.running:
        raise HarnessError("the reactor is running: use the carrier's wait() instead of run_until()")
    results: list[Any] = []
    d.addBoth(results.append)
    deadline = time.monotonic() + timeout
    while not results:
        left = deadline - time.monotonic()
        if left <= 0:
            raise CarrierTimeout(f"the awaited event did not happen within {timeout} s")
        reactor.runUntilCurrent()
        if results:
            break
        due = reactor.timeout()
        reactor.doIteration(left if due is None else min(due, left))
    result = results[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result


def wait_on(clock: Any, d: defer.Deferred[Any], timeout: float) -> defer.Deferred[Any]:
    """``d``'s result, or a ``CarrierTimeout`` once ``timeout`` seconds of ``clock`` pass first."""
    out: defer.Deferred[Any] = defer.Deferred()

    def expire() -> None:
        if not out.called:
            out.errback(CarrierTimeout(f"the awaited event did not happen within {timeout} s"))

    timer = clock.callLater(timeout, expire)

    def done(result: Any) -> None:
        if timer.active():
            timer.cancel()
        if out.called:
            return
        if isinstance(result, Failure):
            out.errback(result)
        else:
            out.callback(result)

    d.addBoth(done)
    return out


def open_carrier(
    name: str,
    *,
    capture: Capture | None = None,
    mapping: Mapping[str, str] | None = None,
    topology: Topology | None = None,
    reactor: Any = None,
    connect_timeout: float = 30.0,
    kept: bool = False,
) -> ICarrier:
    """The one place a carrier is chosen by name. ``mapping`` (virtual IP -> 127.x.y.z) is the loopback
    carrier's, ``topology`` (whose hosts become namespaces) the netns carrier's; ``reactor`` defaults to the
    global one for the carriers that use real sockets, imported only then (a ``-j`` worker or a memory run never
    loads it). ``kept``: the netns carrier uses the kept namespace set (``smtplab netns up``)."""
    if name == "memory":
        from lab.net.memory import MemoryNetwork

        return MemoryNetwork(capture=capture)
    if name not in (*LAB_CARRIERS, EXTERNAL_CARRIER):
        raise HarnessError(f"no carrier {name!r} (there are {', '.join((*LAB_CARRIERS, EXTERNAL_CARRIER))})")
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    if name == "loopback":
        from lab.net.loopback import LoopbackNetwork

        return LoopbackNetwork(mapping or {}, capture=capture, reactor=reactor, connect_timeout=connect_timeout)
    if name == "netns":
        from lab.net.netns_carrier import NetnsNetwork
        from lab.net.topology import default_topology

        return NetnsNetwork(
            topology or default_topology(), capture=capture, reactor=reactor, connect_timeout=connect_timeout, kept=kept
        )
    from lab.net.tcp import TCPCarrier

    return TCPCarrier(capture=capture, reactor=reactor, connect_timeout=connect_timeout)
