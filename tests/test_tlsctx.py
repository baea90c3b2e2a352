"""Real TLS handshakes between ServerTLS and ClientTLS, in memory through Twisted's TLSMemoryBIOProtocol."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from OpenSSL import SSL
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from lab.errors import BadInput
from lab.policy.modes import ClientCert
from lab.tls.certs import CertKey, LabCA, demo_certificate
from lab.tls.tlsctx import ClientTLS, ServerTLS, TLSFacts, tls_error_reason, tls_facts


@implementer(IHandshakeListener)
class Recorder(Protocol):
    """Records the handshake, application data and how the connection ended."""

    def __init__(self) -> None:
        self.handshake_done = False
        self.received = b""
        self.lost: BaseException | None = None
        self.closed = False

    def handshakeCompleted(self) -> None:
        self.handshake_done = True

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        self.closed = True
        self.lost = reason.value


@dataclass
class Pair:
    client: Recorder
    server: Recorder
    client_tls: object
    server_tls: object
    clock: Clock
    rounds: int = 0

    @property
    def client_conn(self) -> SSL.Connection:
        return self.client_tls._tlsConnection  # type: ignore[attr-defined]

    @property
    def server_conn(self) -> SSL.Connection:
        return self.server_tls._tlsConnection  # type: ignore[attr-defined]


def handshake(server: ServerTLS, client: ClientTLS, *, max_rounds: int = 50) -> Pair:
    """Connect both sides and shuttle bytes until neither has anything to say (bounded in rounds)."""
    recorders = {"c": Recorder(), "s": Recorder()}
    addr = IPv4Address("TCP", "127.0.0.1", 25)
    clock = Clock()  # TLSMemoryBIOFactory batches small writes with callLater(0) on this clock
    cfactory = TLSMemoryBIOFactory(client, True, Factory.forProtocol(lambda: recorders["c"]), clock=clock)
    sfactory = TLSMemoryBIOFactory(server, False, Factory.forProtocol(lambda: recorders["s"]), clock=clock)
    cproto, sproto = cfactory.buildProtocol(addr), sfactory.buildProtocol(addr)
    ends = [(StringTransport(), cproto), (StringTransport(), sproto)]
    sproto.makeConnection(ends[1][0])
    cproto.makeConnection(ends[0][0])
    pair = Pair(recorders["c"], recorders["s"], cproto, sproto, clock)
    alive = True
    for pair.rounds in range(1, max_rounds + 1):
        clock.advance(0)
        moved = False
        for (src, _), (_, peer) in ((ends[0], ends[1]), (ends[1], ends[0])):
            data = src.value()
            if data and alive:
                src.clear()
                peer.dataReceived(data)
                moved = True
        if alive and any(t.disconnecting for t, _ in ends):
            alive = False  # one side closed: both learn the connection is gone
            for _, proto in ends:
                proto.connectionLost(Failure(ConnectionDone()))
            moved = True
        if not moved:
            return pair
    raise AssertionError("handshake did not settle")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    state: Path = tmp_path_factory.mktemp("state")
    ca, other = LabCA(state), LabCA.untrusted(state)
    return {
        "ca": ca,
        "server": ca.issue("mx", ["mx.lab.example", "127.0.0.5"]),
        "client": ca.issue("client", ["client.lab.example"], client=True),
        "rogue": other.issue("rogue", ["client.lab.example"], client=True),
    }


def test_default_handshake_is_tls13_and_carries_data(pki) -> None:
    server = ServerTLS(pki["server"])
    client = ClientTLS(server_name="mx.lab.example", trust_pems=[pki["ca"].ca_pem])
    pair = handshake(server, client)
    assert pair.client.handshake_done and pair.server.handshake_done
    facts = tls_facts(pair.client_conn)
    assert isinstance(facts, TLSFacts)
    assert facts.version == "TLSv1.3"
    assert facts.cipher.startswith("TLS_") and facts.bits >= 128
    assert facts.peer_subject == "CN=mx.lab.example"
    assert tls_facts(pair.server_conn).peer_subject is None
    assert client.server_cert_verified(pair.client_conn)
    assert server.client_cert_state(pair.server_conn) is ClientCert.NONE


def test_application_data_flows_after_handshake(pki) -> None:
    server = ServerTLS(pki["server"])
    client = ClientTLS(server_name="mx.lab.example")
    pair = handshake(server, client)
    pair.client_tls.write(b"EHLO client.lab.example\r\n")  # type: ignore[attr-defined]
    pair.clock.advance(0)
    data = pair.client_tls.transport.value()  # type: ignore[attr-defined]
    assert b"EHLO" not in data  # encrypted on the wire
    pair.server_tls.dataReceived(data)  # type: ignore[attr-defined]
    assert pair.server.received == b"EHLO client.lab.example\r\n"


def test_server_min_12_refuses_tls10_only_client(pki) -> None:
    server = ServerTLS(pki["server"], min_version="1.2")
    client = ClientTLS(server_name="mx.lab.example", min_version="1.0", max_version="1.0")
    pair = handshake(server, client)
    assert not pair.client.handshake_done and not pair.server.handshake_done
    assert isinstance(pair.server.lost, SSL.Error)
    assert "protocol" in tls_error_reason(pair.server.lost).lower()
    assert isinstance(pair.client.lost, SSL.Error)


def test_legacy_tls10_works_when_both_allow_it(pki) -> None:
    """The @SECLEVEL=0 adjustment lets an explicitly permissive server and a 1.0-only client agree."""
    server = ServerTLS(pki["server"], min_version="1.0")
    client = ClientTLS(server_name="mx.lab.example", min_version="1.0", max_version="1.0")
    pair = handshake(server, client)
    assert pair.client.handshake_done, pair.client.lost
    assert tls_facts(pair.server_conn).version == "TLSv1"


def test_no_shared_cipher_fails(pki) -> None:
    server = ServerTLS(pki["server"], max_version="1.2", ciphers="ECDHE-ECDSA-AES128-GCM-SHA256")
    client = ClientTLS(max_version="1.2", ciphers="ECDHE-ECDSA-CHACHA20-POLY1305")
    pair = handshake(server, client)
    assert not pair.server.handshake_done
    assert "no shared cipher" in tls_error_reason(pair.server.lost)


def test_tls12_cipher_is_reported(pki) -> None:
    server = ServerTLS(pki["server"], max_version="1.2", ciphers="ECDHE-ECDSA-AES128-GCM-SHA256")
    pair = handshake(server, ClientTLS(max_version="1.2"))
    facts = tls_facts(pair.server_conn)
    assert (facts.version, facts.cipher, facts.bits) == ("TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256", 128)


@pytest.mark.parametrize(
    ("which", "expected"),
    [("client", ClientCert.VERIFIED), ("rogue", ClientCert.UNVERIFIED), (None, ClientCert.NONE)],
)
def test_client_certificate_states(pki, which: str | None, expected: ClientCert) -> None:
    server = ServerTLS(pki["server"], request_client_cert=True, client_ca_pems=[pki["ca"].ca_pem])
    cert: CertKey | None = pki[which] if which else None
    pair = handshake(server, ClientTLS(client_cert=cert))
    assert pair.server.handshake_done  # the handshake completes; the SMTP layer decides
    assert server.client_cert_state(pair.server_conn) is expected
    subject = tls_facts(pair.server_conn).peer_subject
    assert subject == ("CN=client.lab.example" if which else None)


def test_server_certificate_used_as_client_certificate_is_unverified(pki) -> None:
    """A certificate without the clientAuth purpose does not verify as a client certificate."""
    server = ServerTLS(pki["server"], request_client_cert=True, client_ca_pems=[pki["ca"].ca_pem])
    pair = handshake(server, ClientTLS(client_cert=pki["server"]))
    assert server.client_cert_state(pair.server_conn) is ClientCert.UNVERIFIED


def test_demo_certificate_is_not_verified_by_lab_trust(pki) -> None:
    server = ServerTLS(demo_certificate())
    client = ClientTLS(server_name="mx.lab.example", verify=True, trust_pems=[pki["ca"].ca_pem])
    pair = handshake(server, client)
    assert pair.client.handshake_done  # verification never aborts the handshake
    assert not client.server_cert_verified(pair.client_conn)
    assert "Demo" in (tls_facts(pair.client_conn).peer_subject or "")


@pytest.mark.parametrize(
    ("server_name", "verified"),
    [("mx.lab.example", True), ("127.0.0.5", True), ("other.lab.example", False), (None, False)],
)
def test_server_name_must_match(pki, server_name: str | None, verified: bool) -> None:
    client = ClientTLS(server_name=server_name, trust_pems=[pki["ca"].ca_pem])
    pair = handshake(ServerTLS(pki["server"]), client)
    assert client.server_cert_verified(pair.client_conn) is verified


def test_sni_is_sent_for_host_names_only(pki) -> None:
    pair = handshake(ServerTLS(pki["server"]), ClientTLS(server_name="mx.lab.example"))
    assert pair.server_conn.get_servername() == b"mx.lab.example"
    pair = handshake(ServerTLS(pki["server"]), ClientTLS(server_name="127.0.0.5"))
    assert pair.server_conn.get_servername() is None


def test_keylog_lines_are_nss_format(pki) -> None:
    lines: list[bytes] = []
    server_lines: list[bytes] = []
    pair = handshake(ServerTLS(pki["server"], keylog=server_lines.append), ClientTLS(keylog=lines.append))
    assert pair.client.handshake_done
    labels = {line.split(b" ")[0] for line in lines}
    assert {b"CLIENT_HANDSHAKE_TRAFFIC_SECRET", b"CLIENT_TRAFFIC_SECRET_0"} <= labels
    client_random = pair.client_conn.client_random().hex().encode()
    assert all(line.split(b" ")[1] == client_random for line in lines)
    assert sorted(lines) == sorted(server_lines)


def test_one_context_serves_many_connections(pki) -> None:
    server = ServerTLS(pki["server"])
    pairs = [handshake(server, ClientTLS()) for _ in range(3)]
    assert all(p.server.handshake_done for p in pairs)
    assert {id(p.server_conn.get_context()) for p in pairs} == {id(server.context)}


def test_bad_settings_are_bad_input(pki) -> None:
    with pytest.raises(BadInput, match="unknown TLS version"):
        ServerTLS(pki["server"], min_version="1.4")
    with pytest.raises(BadInput, match="above max_version"):
        ClientTLS(min_version="1.3", max_version="1.2")
    with pytest.raises(BadInput, match="no usable cipher"):
        ServerTLS(pki["server"], ciphers="NOT-A-CIPHER")
    with pytest.raises(BadInput, match="PEM"):
        ClientTLS(trust_pems=[b"garbage"])
