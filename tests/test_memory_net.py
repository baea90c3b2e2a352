"""The in-memory carrier: virtual time, refused connections, the listen backlog, determinism, no sockets."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from test_transport import (
    CLIENT,
    GOOD,
    SERVER,
    MiniServer,
    ScriptClient,
    client_factory,
    plaintext_part,
    server_factory,
    session,
    tls_pair_fixture,  # noqa: F401  (the shared certificate fixture)
)
from twisted.internet import defer, error, task
from twisted.internet.protocol import ClientFactory, Protocol, ServerFactory
from twisted.python.failure import Failure

from lab.errors import BadInput, HarnessError
from lab.net.capture import Capture, Direction
from lab.net.memory import CarrierTimeout, MemoryNetwork
from lab.tls.tlsctx import ClientTLS, ServerTLS

Pair = tuple[ServerTLS, ClientTLS]


class Quiet(Protocol):
    """Connects and waits; records data and how it ended."""

    def __init__(self) -> None:
        self.data = b""
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.reason = reason


def quiet_factory(built: list[Quiet] | None = None) -> ClientFactory:
    factory = ClientFactory()

    def build(addr: Any) -> Quiet:
        proto = Quiet()
        if built is not None:
            built.append(proto)
        return proto

    factory.buildProtocol = build  # type: ignore[method-assign]
    return factory


def outcomes(net: MemoryNetwork, deferreds: list[defer.Deferred[Any]]) -> list[str]:
    results: dict[int, str] = {}
    for i, d in enumerate(deferreds):
        d.addCallbacks(
            lambda _, i=i: results.setdefault(i, "connected"), lambda f, i=i: results.setdefault(i, f.type.__name__)
        )
    net.run()
    return [results[i] for i in range(len(deferreds))]


def test_nothing_listening_is_refused_one_round_trip_later() -> None:
    net = MemoryNetwork(latency=0.01)
    d = net.connect(CLIENT, SERVER, 25, quiet_factory())
    with pytest.raises(error.ConnectionRefusedError):
        net.run_until(d)
    assert net.clock.seconds() == pytest.approx(0.02)
    (flow,) = net.capture.flows
    assert flow.refused and flow.closed_by is Direction.S2C and flow.segments == []


def test_backlog_refuses_connections_beyond_it_at_one_instant() -> None:
    net = MemoryNetwork()
    accepted: list[MiniServer] = []
    net.listen(SERVER, 25, server_factory(None, accepted), backlog=3)
    burst = [net.connect(CLIENT, SERVER, 25, quiet_factory()) for _ in range(5)]
    assert outcomes(net, burst) == ["connected"] * 3 + ["ConnectionRefusedError"] * 2
    assert len(accepted) == 3
    assert [f.refused for f in net.capture.flows] == [False] * 3 + [True] * 2


def test_backlog_is_per_instant_spread_connections_are_all_accepted() -> None:
    net = MemoryNetwork()
    accepted: list[MiniServer] = []
    net.listen(SERVER, 25, server_factory(None, accepted), backlog=1)
    spread: list[defer.Deferred[Any]] = []
    for i in range(4):
        net.clock.callLater(i * 0.1, lambda: spread.append(net.connect(CLIENT, SERVER, 25, quiet_factory())))
    net.run()
    assert outcomes(net, spread) == ["connected"] * 4
    assert len(accepted) == 4


def test_stop_listening_refuses_later_connections() -> None:
    net = MemoryNetwork()
    port = net.listen(SERVER, 25, server_factory(None, []))
    assert (port.getHost().host, port.getHost().port) == (SERVER, 25)
    assert net.run_until(net.connect(CLIENT, SERVER, 25, quiet_factory())) is not None
    port.stopListening()
    with pytest.raises(error.ConnectionRefusedError):
        net.run_until(net.connect(CLIENT, SERVER, 25, quiet_factory()))


def test_listening_twice_on_one_address_fails_like_a_real_reactor() -> None:
    net = MemoryNetwork()
    net.listen(SERVER, 25, server_factory(None, []))
    with pytest.raises(error.CannotListenError):
        net.listen(SERVER, 25, server_factory(None, []))
    net.listen(SERVER, 587, server_factory(None, []))  # another port is fine


def test_wildcard_listener_answers_any_address() -> None:
    net = MemoryNetwork()
    built: list[Quiet] = []
    net.listen("0.0.0.0", 25, server_factory(None, []))
    net.run_until(net.connect(CLIENT, "203.0.113.9", 25, quiet_factory(built)))
    net.run()
    assert built[0].data == b"220 mini ready\r\n"
    assert built[0].transport.getPeer().host == "203.0.113.9"


def test_source_ports_are_deterministic_and_can_be_chosen() -> None:
    net = MemoryNetwork()
    net.listen(SERVER, 25, server_factory(None, []))
    for _ in range(2):
        net.connect(CLIENT, SERVER, 25, quiet_factory())
    net.connect("198.51.100.8", SERVER, 25, quiet_factory(), src_port=5555)
    net.run()
    assert [(f.client.ip, f.client.port) for f in net.capture.flows] == [
        (CLIENT, 40000),
        (CLIENT, 40001),
        ("198.51.100.8", 5555),
    ]
    assert all((f.server.ip, f.server.port) == (SERVER, 25) for f in net.capture.flows)


def test_bytes_arrive_after_the_latency_on_the_virtual_clock() -> None:
    net = MemoryNetwork(latency=0.25)
    built: list[Quiet] = []
    net.listen(SERVER, 25, server_factory(None, []))
    net.connect(CLIENT, SERVER, 25, quiet_factory(built))
    net.clock.advance(0.25)
    assert built == []  # the server is connected (and wrote its banner), the SYN-ACK is not back yet
    net.clock.advance(0.25)  # connected at 2L; the banner, written at L, arrives in the same instant, after it
    assert built[0].data == b"220 mini ready\r\n"
    (flow,) = net.capture.flows
    assert [(s.time, s.direction, s.data) for s in flow.segments] == [(0.5, Direction.S2C, b"220 mini ready\r\n")]


def test_server_factory_building_nothing_closes_at_once() -> None:
    net = MemoryNetwork()
    factory = ServerFactory()
    factory.buildProtocol = lambda addr: None  # type: ignore[method-assign]
    net.listen(SERVER, 25, factory)
    built: list[Quiet] = []
    net.run_until(net.connect(CLIENT, SERVER, 25, quiet_factory(built)))
    net.run()
    assert built[0].data == b""
    assert built[0].reason is not None and built[0].reason.check(error.ConnectionDone)
    assert net.capture.flows[0].closed_by is Direction.S2C


def test_two_runs_give_identical_plaintext_and_timing(tls_pair: Pair) -> None:
    def run() -> tuple[list[Any], list[tuple[float, Direction]], tuple[float | None, Direction | None]]:
        net, _, client = session(tls_pair, GOOD)
        (flow,) = net.capture.flows
        assert client.handshakes == 1
        timing = [(s.time, s.direction) for s in flow.segments]
        return plaintext_part(flow), timing, (flow.closed, flow.closed_by)

    first, second = run(), run()
    assert first[0] and first == second


def test_run_until_times_out_in_virtual_time() -> None:
    net = MemoryNetwork()
    net.clock.callLater(1000, lambda: None)  # something scheduled, but not the awaited event
    with pytest.raises(CarrierTimeout):
        net.run_until(defer.Deferred(), timeout=5)
    assert net.clock.seconds() == pytest.approx(5)
    net.clock.getDelayedCalls()[0].cancel()
    with pytest.raises(CarrierTimeout, match="nothing left"):
        net.run_until(defer.Deferred(), timeout=5)


def test_run_is_bounded_when_the_network_never_goes_idle() -> None:
    net = MemoryNetwork()
    loop = task.LoopingCall(lambda: None)
    loop.clock = net.clock
    loop.start(1.0)
    with pytest.raises(HarnessError, match="idle"):
        net.run(max_steps=50)
    assert net.clock.seconds() == pytest.approx(50)
    loop.stop()


def test_run_until_returns_results_and_raises_failures() -> None:
    net = MemoryNetwork()
    ok: defer.Deferred[str] = defer.Deferred()
    net.clock.callLater(3, ok.callback, "done")
    assert net.run_until(ok) == "done"
    bad: defer.Deferred[str] = defer.Deferred()
    net.clock.callLater(3, bad.errback, Failure(ValueError("boom")))
    with pytest.raises(ValueError, match="boom"):
        net.run_until(bad)
    assert net.clock.seconds() == pytest.approx(6)
    result = []
    net.wait(net.connect(CLIENT, SERVER, 25, quiet_factory())).addErrback(lambda f: result.append(f.type))
    assert result == [error.ConnectionRefusedError]


def test_a_protocol_bug_surfaces_as_an_exception() -> None:
    class Broken(MiniServer):
        def lineReceived(self, line: bytes) -> None:
            raise RuntimeError("listener bug")

    net = MemoryNetwork()
    factory = ServerFactory()
    factory.buildProtocol = lambda addr: Broken(None)  # type: ignore[method-assign]
    net.listen(SERVER, 25, factory)
    net.connect(CLIENT, SERVER, 25, client_factory([b"EHLO a"], None))
    with pytest.raises(RuntimeError, match="listener bug"):
        net.run()


def test_user_errors_are_bad_input() -> None:
    net = MemoryNetwork()
    with pytest.raises(BadInput, match="IPv4"):
        net.listen("mx.example.test", 25, server_factory(None, []))
    with pytest.raises(BadInput, match="port"):
        net.connect(CLIENT, SERVER, 70000, quiet_factory())
    with pytest.raises(BadInput, match="backlog"):
        net.listen(SERVER, 25, server_factory(None, []), backlog=0)
    with pytest.raises(BadInput, match="latency"):
        MemoryNetwork(latency=-1)


def test_no_real_socket_is_opened(tls_pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the memory carrier opened a socket")

    monkeypatch.setattr(socket, "socket", forbidden)
    capture = Capture()
    _, _, client = session(tls_pair, GOOD, net=MemoryNetwork(capture=capture))
    assert client.handshakes == 1 and capture.flows[0].closed_by is Direction.S2C


def test_client_protocol_gets_virtual_addresses_and_connection_order(tls_pair: Pair) -> None:
    net = MemoryNetwork()
    servers: list[MiniServer] = []
    net.listen(SERVER, 2525, server_factory(tls_pair[0], servers))
    client: ScriptClient = net.run_until(net.connect(CLIENT, SERVER, 2525, client_factory([b"QUIT"], tls_pair[1])))
    assert client.transport.getPeer().port == 2525
    net.run()
    assert client.replies == [(False, b"220 mini ready"), (False, b"221 bye")]
    assert servers[0].transport.getHost().port == 2525
