"""SessionTransport: real TLS layered over a raw pipe, capture below TLS, Twisted's startTLS semantics.

The raw pipe here is the memory carrier's link (a real part, not a double); the loopback tests run the same
protocols over TCP. ``MiniServer`` / ``ScriptClient`` are shared by the carrier tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from OpenSSL import SSL
from twisted.internet import defer, error
from twisted.internet.interfaces import IHandshakeListener, ISSLTransport
from twisted.internet.protocol import ClientFactory, ServerFactory
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from lab.errors import HarnessError
from lab.net.capture import Direction, Flow
from lab.net.memory import MemoryNetwork
from lab.tls.certs import LabCA
from lab.tls.tlsctx import ClientTLS, ServerTLS

SERVER, CLIENT = "192.168.2.1", "198.51.100.7"
TLS_RECORD_TYPES = {0x14, 0x15, 0x16, 0x17}


@pytest.fixture(name="tls_pair", scope="session")
def tls_pair_fixture(tmp_path_factory: pytest.TempPathFactory) -> tuple[ServerTLS, ClientTLS]:
    ca = LabCA(Path(tmp_path_factory.mktemp("ca")))
    server = ServerTLS(ca.issue("mx", ["mx.example.test"]))
    client = ClientTLS(server_name="mx.example.test", verify=True, trust_pems=[ca.ca_pem])
    return server, client


@implementer(IHandshakeListener)
class MiniServer(LineReceiver):
    """A tiny SMTP-shaped line server: banner, EHLO with STARTTLS, STARTTLS, echo, QUIT."""

    def __init__(self, tls: Any, capabilities: Sequence[bytes] = (b"STARTTLS",)) -> None:
        self.tls = tls
        self.capabilities = list(capabilities)
        self.lines: list[tuple[bool, bytes]] = []  # (inside TLS, line)
        self.leftover: bytes | None = None  # plaintext that came behind STARTTLS in the same chunk
        self.handshakes = 0
        self.version: str | None = None
        self.reason: Failure | None = None
        self.in_tls = False
        self.gone: defer.Deferred[MiniServer] = defer.Deferred()

    def connectionMade(self) -> None:
        self.sendLine(b"220 mini ready")

    def lineReceived(self, line: bytes) -> None:
        self.lines.append((self.in_tls, line))
        verb = line.split(b" ")[0].upper()
        if verb == b"EHLO":
            caps = [] if self.in_tls else self.capabilities
            out = [b"250-mini", *[b"250-" + c for c in caps]]
            self.transport.write(b"".join(x + b"\r\n" for x in out) + b"250 SIZE 1000\r\n")
        elif verb == b"STARTTLS":
            self.sendLine(b"220 go ahead")
            self.leftover = self.clearLineBuffer()  # rule 3: never execute it inside TLS
            self.in_tls = True
            self.transport.startTLS(self.tls)
        elif verb == b"QUIT":
            self.sendLine(b"221 bye")
            self.transport.loseConnection()
        else:
            self.sendLine(b"250 echo " + line)

    def handshakeCompleted(self) -> None:
        self.handshakes += 1
        self.version = self.transport.getHandle().get_protocol_version_name()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.reason = reason
        self.gone.callback(self)


@implementer(IHandshakeListener)
class ScriptClient(LineReceiver):
    """Sends one command per complete reply; ``STARTTLS`` starts TLS on a 220; ``!close``/``!abort`` end it."""

    def __init__(self, script: Sequence[bytes], tls: Any) -> None:
        self.script = list(script)
        self.tls = tls
        self.replies: list[tuple[bool, bytes]] = []
        self.handle: SSL.Connection | None = None
        self.handshakes = 0
        self.reason: Failure | None = None
        self.in_tls = False
        self.done: defer.Deferred[ScriptClient] = defer.Deferred()
        self.sent_starttls = False

    def lineReceived(self, line: bytes) -> None:
        self.replies.append((self.in_tls, line))
        if line[3:4] == b"-":
            return
        if self.sent_starttls and not self.in_tls:
            self.sent_starttls = False
            if line.startswith(b"220"):
                self.in_tls = True
                self.transport.startTLS(self.tls)
                return
        self.next()

    def next(self) -> None:
        if not self.script:
            return
        command = self.script.pop(0)
        if command == b"!close":
            self.transport.loseConnection()
        elif command == b"!abort":
            self.transport.abortConnection()
        elif command.startswith(b"!raw "):
            self.transport.write(command[5:])
        else:
            self.sent_starttls = command.upper() == b"STARTTLS" or command.upper().startswith(b"STARTTLS\r\n")
            self.transport.write(command if command.endswith(b"\n") else command + b"\r\n")

    def handshakeCompleted(self) -> None:
        self.handshakes += 1
        self.handle = self.transport.getHandle()
        self.next()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.reason = reason
        self.done.callback(self)


def server_factory(tls: Any, servers: list[MiniServer], **kwargs: Any) -> ServerFactory:
    factory = ServerFactory()

    def build(addr: Any) -> MiniServer:
        server = MiniServer(tls, **kwargs)
        server.factory = factory
        servers.append(server)
        return server

    factory.buildProtocol = build  # type: ignore[method-assign]
    return factory


def client_factory(script: Sequence[bytes], tls: Any) -> ClientFactory:
    factory = ClientFactory()
    factory.buildProtocol = lambda addr: ScriptClient(script, tls)  # type: ignore[method-assign]
    return factory


def tls_segments_ok(flow: Flow) -> bool:
    """Every chunk after the client's first TLS byte starts with a TLS record header (type, 0x03)."""
    seen_tls = False
    for seg in flow.segments:
        if seg.data[0] in TLS_RECORD_TYPES:
            seen_tls = True
        if seen_tls and not (seg.data[0] in TLS_RECORD_TYPES and seg.data[1] == 0x03):
            return False
    return seen_tls


def plaintext_part(flow: Flow) -> list[tuple[float, Direction, bytes]]:
    out = []
    for seg in flow.segments:
        if seg.data[0] in TLS_RECORD_TYPES:
            break
        out.append((seg.time, seg.direction, seg.data))
    return out


def session(
    tls_pair: tuple[ServerTLS, ClientTLS],
    script: Sequence[bytes],
    *,
    server_tls: Any = None,
    client_tls: Any = None,
    net: MemoryNetwork | None = None,
    middleboxes: Sequence[Any] = (),
    finish: bool = True,
) -> tuple[MemoryNetwork, MiniServer, ScriptClient]:
    """Run ``script`` against a MiniServer on a memory network; with ``finish``, until the client is closed."""
    net = net or MemoryNetwork()
    servers: list[MiniServer] = []
    net.listen(SERVER, 25, server_factory(server_tls or tls_pair[0], servers))
    d = net.connect(CLIENT, SERVER, 25, client_factory(script, client_tls or tls_pair[1]), middleboxes=middleboxes)
    client: ScriptClient = net.run_until(d)
    if finish:
        net.run_until(client.done)
    net.run()
    return net, servers[0], client


GOOD = [b"EHLO client.example", b"STARTTLS", b"EHLO client.example", b"MAIL FROM:<secret@example.net>", b"QUIT"]


def test_handshake_completes_tls13_and_protocols_get_the_contract(tls_pair: tuple[ServerTLS, ClientTLS]) -> None:
    _, server, client = session(tls_pair, GOOD)
    assert server.handshakes == client.handshakes == 1
    assert server.version == "TLSv1.3"
    assert client.handle is not None and client.handle.get_protocol_version_name() == "TLSv1.3"
    assert tls_pair[1].server_cert_verified(client.handle)
    assert ISSLTransport.providedBy(client.transport) and ISSLTransport.providedBy(server.transport)
    assert client.transport.TLS and server.transport.TLS
    assert (True, b"MAIL FROM:<secret@example.net>") in server.lines
    assert (True, b"250 echo MAIL FROM:<secret@example.net>") in client.replies
    assert (True, b"221 bye") in client.replies
    assert server.reason is not None and server.reason.check(error.ConnectionDone)
    assert client.reason is not None and client.reason.check(error.ConnectionDone)


def test_plain_transport_is_not_ssl_before_starttls(tls_pair: tuple[ServerTLS, ClientTLS]) -> None:
    _, _, client = session(tls_pair, [b"EHLO a", b"QUIT"])
    assert not ISSLTransport.providedBy(client.transport)
    assert client.transport.getHandle() is None
    assert not client.transport.TLS
    assert client.replies[-1] == (False, b"221 bye")


def test_capture_is_plaintext_then_tls_records_and_hides_the_secret(tls_pair: tuple[ServerTLS, ClientTLS]) -> None:
    net, _, _ = session(tls_pair, GOOD)
    (flow,) = net.capture.flows
    plain = plaintext_part(flow)
    assert b"".join(d for _, direction, d in plain if direction is Direction.C2S) == (
        b"EHLO client.example\r\nSTARTTLS\r\n"
    )
    assert b"".join(d for _, direction, d in plain if direction is Direction.S2C) == (
        b"220 mini ready\r\n250-mini\r\n250-STARTTLS\r\n250 SIZE 1000\r\n220 go ahead\r\n"
    )
    assert tls_segments_ok(flow)
    first_tls = flow.segments[len(plain)]
    assert first_tls.direction is Direction.C2S and first_tls.data[:1] == b"\x16"  # the ClientHello
    assert b"secret@example.net" not in flow.payload(Direction.C2S)
    assert flow.closed_by is Direction.S2C  # the server's 221 + close came first


def test_bytes_behind_starttls_stay_with_the_protocol_and_never_reach_tls(
    tls_pair: tuple[ServerTLS, ClientTLS],
) -> None:
    script = [b"EHLO a", b"STARTTLS\r\nMAIL FROM:<injected@example.net>\r\n", b"EHLO a", b"QUIT"]
    net, server, client = session(tls_pair, script)
    assert server.leftover == b"MAIL FROM:<injected@example.net>\r\n"
    assert not any(b"injected" in line for _, line in server.lines)
    assert server.handshakes == 1  # the next chunk (the ClientHello) went to TLS
    assert (True, b"221 bye") in client.replies
    (flow,) = net.capture.flows
    assert b"STARTTLS\r\nMAIL FROM:<injected@example.net>\r\n" in flow.payload(Direction.C2S)


def test_failed_handshake_ends_in_connection_lost_with_the_ssl_error(
    tls_pair: tuple[ServerTLS, ClientTLS],
) -> None:
    legacy = ClientTLS(min_version="1.0", max_version="1.1")
    net, server, client = session(tls_pair, [b"EHLO a", b"STARTTLS", b"QUIT"], client_tls=legacy)
    assert server.handshakes == client.handshakes == 0
    assert server.reason is not None and server.reason.check(SSL.Error)
    assert client.reason is not None and client.reason.check(SSL.Error)
    assert "protocol version" in str(client.reason.value)
    (flow,) = net.capture.flows
    assert flow.closed_by is Direction.S2C  # the server refused the ClientHello and sent the alert
    assert flow.segments[-1].direction is Direction.S2C and flow.segments[-1].data[0] == 0x15  # alert record


def test_lose_connection_inside_tls_sends_close_notify(tls_pair: tuple[ServerTLS, ClientTLS]) -> None:
    tls12 = ClientTLS(max_version="1.2")  # TLS 1.2 keeps the alert record type visible on the wire
    net, server, client = session(tls_pair, [b"EHLO a", b"STARTTLS", b"EHLO a", b"!close"], client_tls=tls12)
    (flow,) = net.capture.flows
    assert flow.closed_by is Direction.C2S
    c2s = [s for s in flow.segments if s.direction is Direction.C2S]
    s2c = [s for s in flow.segments if s.direction is Direction.S2C]
    assert c2s[-1].data[0] == 0x15  # client's close_notify
    assert s2c[-1].data[0] == 0x15  # server answered with its own
    assert client.handle is not None and client.handle.get_shutdown() == SSL.SENT_SHUTDOWN | SSL.RECEIVED_SHUTDOWN
    assert server.reason is not None and server.reason.check(error.ConnectionDone)
    assert client.reason is not None and client.reason.check(error.ConnectionDone)


def test_abort_mid_handshake_is_the_clients_close(tls_pair: tuple[ServerTLS, ClientTLS]) -> None:
    net = MemoryNetwork()
    servers: list[MiniServer] = []
    net.listen(SERVER, 25, server_factory(tls_pair[0], servers))
    d = net.connect(CLIENT, SERVER, 25, client_factory([b"EHLO a", b"STARTTLS"], tls_pair[1]))
    client: ScriptClient = net.run_until(d)
    for _ in range(20):  # advance until the client has sent its ClientHello
        if client.in_tls:
            break
        net.clock.advance(net.latency)
    assert client.in_tls and client.handshakes == 0
    client.transport.abortConnection()
    net.run()
    (flow,) = net.capture.flows
    assert flow.closed_by is Direction.C2S
    # Twisted's TLS layer turns the EOF in the middle of a handshake into ConnectionLost (so does TCP startTLS)
    assert client.reason is not None and client.reason.check(error.ConnectionLost)
    assert servers[0].handshakes == 0
    assert servers[0].reason is not None and not servers[0].reason.check(error.ConnectionDone)


def test_plaintext_close_by_client_and_virtual_addresses(tls_pair: tuple[ServerTLS, ClientTLS]) -> None:
    net, server, client = session(tls_pair, [b"EHLO a", b"!close"])
    (flow,) = net.capture.flows
    assert flow.closed_by is Direction.C2S
    # connect at 0, server up at L, banner at the client at 2L, EHLO at 3L, its reply at 4L, then the close
    assert flow.closed == pytest.approx(4 * net.latency)
    peer, host = client.transport.getPeer(), client.transport.getHost()
    assert (peer.type, peer.host, peer.port) == ("TCP", SERVER, 25)
    assert (host.host, host.port) == (CLIENT, 40000)
    assert (server.transport.getPeer().host, server.transport.getPeer().port) == (CLIENT, 40000)
    assert server.transport.getHost().host == SERVER


def test_start_tls_twice_is_a_harness_error(tls_pair: tuple[ServerTLS, ClientTLS]) -> None:
    _, server, _ = session(tls_pair, [b"EHLO a", b"STARTTLS", b"EHLO a"], finish=False)
    assert server.handshakes == 1
    with pytest.raises(HarnessError):
        server.transport.startTLS(tls_pair[0])
