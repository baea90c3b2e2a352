"""The loopback carrier on the real reactor: real TCP on 127.x.y.z, virtual addresses, capture below TLS.

Also checks that SessionTransport and Twisted's own TCP ``startTLS`` interoperate and fail the same way, so a
protocol behaves the same on both.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from OpenSSL import SSL
from test_transport import (
    CLIENT,
    GOOD,
    SERVER,
    MiniServer,
    ScriptClient,
    client_factory,
    plaintext_part,
    server_factory,
    tls_pair_fixture,  # noqa: F401  (the shared certificate fixture)
    tls_segments_ok,
)
from twisted.internet import defer, error, reactor
from twisted.internet.protocol import ClientFactory

from lab.errors import BadInput, HarnessError
from lab.net.capture import Direction
from lab.net.loopback import LoopbackNetwork
from lab.net.memory import CarrierTimeout
from lab.net.middlebox import StartTLSStripper
from lab.tls.tlsctx import ClientTLS, ServerTLS

Pair = tuple[ServerTLS, ClientTLS]
EXTERNAL = "203.0.113.25"  # a virtual host served by something outside the network (Twisted's own TCP here)
_next = [0]


def fresh() -> str:
    """A 127.x address no other test uses: each virtual host its own."""
    _next[0] += 1
    return f"127.61.{os.getpid() % 200 + 20}.{_next[0]}"


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def network(**kwargs: Any) -> LoopbackNetwork:
    return LoopbackNetwork({SERVER: fresh(), CLIENT: fresh(), EXTERNAL: fresh()}, **kwargs)


def test_mapping_must_give_each_host_its_own_loopback_address() -> None:
    with pytest.raises(BadInput, match=r"127\.0\.0\.1"):
        LoopbackNetwork({SERVER: "127.0.0.1"})
    assert LoopbackNetwork({SERVER: "127.0.0.1"}, allow_localhost=True).loopback_of(SERVER) == "127.0.0.1"
    with pytest.raises(BadInput, match=r"127\.0\.0\.0/8"):
        LoopbackNetwork({SERVER: "10.0.0.1"})
    with pytest.raises(BadInput, match="share"):
        LoopbackNetwork({SERVER: "127.61.0.1", CLIENT: "127.61.0.1"})
    with pytest.raises(BadInput, match="no loopback address"):
        LoopbackNetwork({SERVER: "127.61.0.1"}).listen("192.0.2.99", 25, server_factory(None, []))


@pytest_twisted.inlineCallbacks
def test_session_over_tcp_sees_virtual_addresses_and_records_once(tls_pair: Pair) -> Any:
    net = network()
    servers: list[MiniServer] = []
    try:
        port = net.listen(SERVER, 25, server_factory(tls_pair[0], servers))
        lo, real_port = net.ports[(SERVER, 25)]
        assert lo == net.mapping[SERVER] and real_port != 25 and (port.real.host, port.real.port) == (lo, real_port)
        client: ScriptClient = yield net.wait(net.connect(CLIENT, SERVER, 25, client_factory(GOOD, tls_pair[1])), 10)
        yield net.wait(client.done, 10)
        server = yield net.wait(servers[0].gone, 10)
    finally:
        yield net.close()
    assert client.handle is not None and client.handle.get_protocol_version_name() == "TLSv1.3"
    assert server.version == "TLSv1.3" and (True, b"221 bye") in client.replies
    (flow,) = net.capture.flows  # the server side did not open a second flow for the same connection
    assert (flow.server.ip, flow.server.port) == (SERVER, 25) and flow.client.ip == CLIENT
    assert (server.transport.getHost().host, server.transport.getHost().port) == (SERVER, 25)
    assert (server.transport.getPeer().host, server.transport.getPeer().port) == (CLIENT, flow.client.port)
    assert (client.transport.getPeer().host, client.transport.getPeer().port) == (SERVER, 25)
    assert client.transport.getHost().host == CLIENT
    plain = b"".join(d for _, direction, d in plaintext_part(flow) if direction is Direction.C2S)
    assert plain == b"EHLO client.example\r\nSTARTTLS\r\n"
    assert tls_segments_ok(flow) and b"secret@example.net" not in flow.payload(Direction.C2S)
    times = [s.time for s in flow.segments]
    assert times == sorted(times) and 0 <= times[0] < 10
    assert flow.closed_by is Direction.S2C


@pytest_twisted.inlineCallbacks
def test_nothing_listening_is_refused(tls_pair: Pair) -> Any:
    lo = fresh()
    net = LoopbackNetwork({SERVER: lo, CLIENT: fresh()}, port_map={2526: free_port(lo)})
    try:
        with pytest.raises(error.ConnectionRefusedError):
            yield net.wait(net.connect(CLIENT, SERVER, 2526, client_factory([], None)), 10)
    finally:
        yield net.close()
    (flow,) = net.capture.flows
    assert flow.refused and flow.segments == [] and (flow.server.ip, flow.server.port) == (SERVER, 2526)


@pytest_twisted.inlineCallbacks
def test_middleboxes_work_over_tcp(tls_pair: Pair) -> Any:
    net = network()
    strip, answer = StartTLSStripper(), StartTLSStripper(rewrite=False, answer_starttls=454)
    servers: list[MiniServer] = []
    try:
        net.listen(SERVER, 25, server_factory(tls_pair[0], servers))
        script = [b"EHLO a", b"STARTTLS", b"QUIT"]
        factory = client_factory(script, tls_pair[1])
        client: ScriptClient = yield net.wait(net.connect(CLIENT, SERVER, 25, factory, middleboxes=[strip, answer]))
        yield net.wait(client.done, 10)
        yield net.wait(servers[0].gone, 10)
    finally:
        yield net.close()
    assert (False, b"250-XXXXXXXA") in client.replies
    assert (False, b"454 4.7.0 TLS not available") in client.replies
    assert [line for _, line in servers[0].lines] == [b"EHLO a", b"QUIT"]
    (flow,) = net.capture.flows
    assert b"250-XXXXXXXA" in flow.payload(Direction.S2C) and b"STARTTLS" not in flow.payload(Direction.S2C)
    assert len(strip.notes) == len(answer.notes) == 1


@pytest_twisted.inlineCallbacks
def test_our_client_against_twisteds_own_tcp_starttls(tls_pair: Pair) -> Any:
    """Success and failure look the same to both sides whichever implementation carries the TLS."""
    lo_ext = fresh()
    servers: list[MiniServer] = []
    native = reactor.listenTCP(0, server_factory(tls_pair[0], servers), interface=lo_ext)
    net = LoopbackNetwork({CLIENT: fresh(), EXTERNAL: lo_ext}, port_map={25: native.getHost().port})
    try:
        good: ScriptClient = yield net.wait(net.connect(CLIENT, EXTERNAL, 25, client_factory(GOOD, tls_pair[1])))
        yield net.wait(good.done, 10)
        yield net.wait(servers[0].gone, 10)
        legacy = ClientTLS(min_version="1.0", max_version="1.1")
        bad: ScriptClient = yield net.wait(
            net.connect(CLIENT, EXTERNAL, 25, client_factory([b"EHLO a", b"STARTTLS", b"QUIT"], legacy))
        )
        yield net.wait(bad.done, 10)
        yield net.wait(servers[1].gone, 10)
    finally:
        yield net.close()
        yield native.stopListening()
    assert servers[0].version == "TLSv1.3" and good.handshakes == 1 and (True, b"221 bye") in good.replies
    assert good.reason is not None and good.reason.check(error.ConnectionDone)
    assert servers[1].reason is not None and servers[1].reason.check(SSL.Error)  # Twisted's own TCP startTLS
    assert bad.reason is not None and bad.reason.check(SSL.Error)  # SessionTransport: the same contract
    assert [f.closed_by for f in net.capture.flows] == [Direction.S2C, Direction.S2C]


@pytest_twisted.inlineCallbacks
def test_twisteds_own_tcp_client_against_our_listener_is_recorded_server_side(tls_pair: Pair) -> Any:
    net = network()
    servers: list[MiniServer] = []
    lo_outside = fresh()  # not in the mapping: a peer from outside keeps its real address
    try:
        net.listen(SERVER, 25, server_factory(tls_pair[0], servers))
        lo, real_port = net.ports[(SERVER, 25)]
        client = ScriptClient(GOOD, tls_pair[1])
        connected = defer.Deferred()

        class Once(ClientFactory):
            def buildProtocol(self, addr: Any) -> ScriptClient:
                connected.callback(None)
                return client

        reactor.connectTCP(lo, real_port, Once(), bindAddress=(lo_outside, 0))
        yield net.wait(connected, 10)
        yield net.wait(client.done, 10)
        yield net.wait(servers[0].gone, 10)
    finally:
        yield net.close()
    assert client.handshakes == 1 and (True, b"221 bye") in client.replies
    (flow,) = net.capture.flows
    assert flow.client.ip == lo_outside and (flow.server.ip, flow.server.port) == (SERVER, 25)
    assert servers[0].transport.getPeer().host == lo_outside
    assert b"".join(d for _, direction, d in plaintext_part(flow) if direction is Direction.S2C).startswith(
        b"220 mini ready\r\n"
    )
    assert tls_segments_ok(flow) and flow.closed_by is Direction.S2C


@pytest_twisted.inlineCallbacks
def test_wait_times_out_and_run_until_refuses_a_running_reactor() -> Any:
    net = network()
    with pytest.raises(CarrierTimeout):
        yield net.wait(defer.Deferred(), timeout=0.05)
    with pytest.raises(HarnessError, match="wait"):
        net.run_until(defer.Deferred(), timeout=0.05)


def test_run_until_drives_a_reactor_that_is_not_running(tmp_path: Path) -> None:
    """A synchronous caller (a command-line run) iterates the reactor itself; checked in a fresh process."""
    script = textwrap.dedent(
        f"""
        import json, sys
        from twisted.internet import defer
        from twisted.internet.protocol import ClientFactory, Protocol, ServerFactory
        from lab.net.loopback import LoopbackNetwork
        from lab.net.memory import CarrierTimeout

        class Banner(Protocol):
            def connectionMade(self):
                self.transport.write(b"220 hello\\r\\n")
                self.transport.loseConnection()

        class Read(Protocol):
            def __init__(self):
                self.data, self.done = b"", defer.Deferred()
            def dataReceived(self, data):
                self.data += data
            def connectionLost(self, reason):
                self.done.callback(self.data)

        net = LoopbackNetwork({{"{SERVER}": "{fresh()}", "{CLIENT}": "{fresh()}"}})
        server = ServerFactory(); server.protocol = Banner
        client = ClientFactory(); client.protocol = Read
        net.listen("{SERVER}", 25, server)
        proto = net.run_until(net.connect("{CLIENT}", "{SERVER}", 25, client), timeout=5)
        data = net.run_until(proto.done, timeout=5)
        try:
            net.run_until(defer.Deferred(), timeout=0.1)
            timed_out = False
        except CarrierTimeout:
            timed_out = True
        flow = net.capture.flows[0]
        print(json.dumps({{"data": data.decode(), "timed_out": timed_out, "closed_by": flow.closed_by,
                           "peer": proto.transport.getPeer().host}}))
        """
    )
    path = tmp_path / "sync_run.py"
    path.write_text(script)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result == {"data": "220 hello\r\n", "timed_out": True, "closed_by": "s2c", "peer": SERVER}
