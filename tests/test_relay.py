"""The relay that puts a middlebox in front of an external target (lab/net/relay.py, docs/conformance.md).

Unit level, over real loopback TCP: it rewrites ``250-STARTTLS`` (same length) and answers STARTTLS with 454,
forwards everything else byte for byte, closes each side when the other closes, and stops reading while a side
does not drain. Then end to end: ``smtplab run --target`` against a real Postfix runs the stripping cases
through the relay instead of calling them lab-only.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from peers import next_address, require_kind
from peers.postfix import PostfixPeer
from test_interop import _smtplab
from twisted.internet import defer, reactor, task
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.python.failure import Failure

from lab.net.middlebox import MAX_HELD, StartTLSStripper
from lab.net.relay import MiddleboxRelay
from lab.scenario.result import CaseRun
from lab.scenario.verdict import Verdict
from lab.tls.certs import LabCA

_next = [0]
CAPABILITIES = b"220 mx ready\r\n250-mx.example\r\n250-PIPELINING\r\n250-STARTTLS\r\n250 8BITMIME\r\n"
WAIT = 30.0  # an upper bound for an event on loopback, never a measure
FLOOD_CAP = 256 * 2**20  # a relay that kept reading would take all of this; a bounded one stalls long before


def fresh() -> str:
    """A 127.x address of this test process's own (target, relay, client each get one)."""
    _next[0] += 1
    return f"127.62.{os.getpid() % 200 + 20}.{_next[0]}"


def timely(d: defer.Deferred[Any], what: str) -> defer.Deferred[Any]:
    """``d``, failing if it has not fired within WAIT seconds (so a broken relay fails instead of hanging)."""
    return d.addTimeout(WAIT, reactor, onTimeoutCancel=lambda *_: pytest.fail(f"{what}: not within {WAIT:g} s"))


class Peer(Protocol):
    """Either end in the unit tests: sends ``greeting``, records what arrives, fires ``gone`` when closed."""

    def __init__(self, greeting: bytes = b"", paused: bool = False) -> None:
        self.greeting, self.start_paused = greeting, paused
        self.received = bytearray()
        self.made: defer.Deferred[Peer] = defer.Deferred()
        self.gone: defer.Deferred[Peer] = defer.Deferred()
        self.reason: Failure | None = None
        self.waiting: list[tuple[int, defer.Deferred[None]]] = []

    def connectionMade(self) -> None:
        if self.start_paused:
            self.transport.pauseProducing()
        if self.greeting:
            self.transport.write(self.greeting)
        self.made.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        for item in [w for w in self.waiting if len(self.received) >= w[0]]:
            self.waiting.remove(item)
            item[1].callback(None)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.reason = reason
        self.gone.callback(self)

    def has(self, count: int) -> defer.Deferred[None]:
        """Fires once ``count`` bytes have arrived."""
        d: defer.Deferred[None] = defer.Deferred()
        self.waiting.append((count, d))
        self.dataReceived(b"")
        return d


class Target:
    """A listening target whose connections are ``Peer`` objects built by ``make``."""

    def __init__(self, make: Any) -> None:
        self.peers: list[Peer] = []
        self.accepted: defer.Deferred[Peer] = defer.Deferred()
        target = self

        class Build(Factory):
            def buildProtocol(self, addr: Any) -> Peer:
                peer = make()
                target.peers.append(peer)
                peer.made.addCallback(lambda p: target.accepted.called or target.accepted.callback(p))
                return peer

        self.port = reactor.listenTCP(0, Build(), interface=fresh())
        self.host, self.number = self.port.getHost().host, self.port.getHost().port


def connect(address: tuple[str, int], peer: Peer) -> defer.Deferred[Peer]:
    class Once(ClientFactory):
        def buildProtocol(self, addr: Any) -> Peer:
            return peer

    reactor.connectTCP(*address, Once(), bindAddress=(fresh(), 0))
    return timely(peer.made, "connected to the relay")


def buffered(transport: Any) -> int:
    """What sits in a Twisted TCP transport's write buffer (its own bookkeeping; for the bound check only)."""
    return len(transport.dataBuffer) + transport._tempDataLen


@pytest_twisted.inlineCallbacks
def test_rewrites_starttls_and_forwards_everything_else_byte_for_byte() -> Any:
    noise = random.Random(8).randbytes(300_000)  # crosses many reads, has bytes of every value
    assert b"STARTTLS" not in noise
    target = Target(lambda: Peer(CAPABILITIES + noise))
    box = StartTLSStripper()
    relay = MiddleboxRelay(target.host, target.number, [box], address=fresh())
    client = Peer(b"EHLO me\r\n" + noise)
    try:
        yield connect(relay.start(), client)
        server = yield timely(target.accepted, "the relay connected to the target")
        yield timely(client.has(len(CAPABILITIES) + len(noise)), "the target's bytes reached the client")
        yield timely(server.has(len(b"EHLO me\r\n") + len(noise)), "the client's bytes reached the target")
    finally:
        yield relay.stop()
        yield target.port.stopListening()
    shown = CAPABILITIES.replace(b"250-STARTTLS", b"250-XXXXXXXA")
    assert len(shown) == len(CAPABILITIES)
    assert bytes(client.received) == shown + noise
    assert bytes(server.received) == b"EHLO me\r\n" + noise
    assert box.notes == ["middlebox rewrote STARTTLS: 250-STARTTLS -> 250-XXXXXXXA"]
    (made,) = target.peers
    assert made.transport.getPeer().host == relay.address  # the target sees the relay's own address


@pytest_twisted.inlineCallbacks
def test_answers_starttls_itself_and_never_forwards_it() -> Any:
    target = Target(lambda: Peer(CAPABILITIES))
    relay = MiddleboxRelay(target.host, target.number, [StartTLSStripper(rewrite=False, answer_starttls=454)])
    client = Peer()
    try:
        yield connect(relay.start(), client)
        yield timely(client.has(len(CAPABILITIES)), "the banner and EHLO reply")
        client.transport.write(b"EHLO me\r\nSTARTTLS\r\nMAIL FROM:<a@example.net>\r\n")
        answer = b"454 4.7.0 TLS not available\r\n"
        yield timely(client.has(len(CAPABILITIES) + len(answer)), "the relay's own answer")
        server = target.peers[0]
        yield timely(server.has(len(b"EHLO me\r\nMAIL FROM:<a@example.net>\r\n")), "the rest at the target")
    finally:
        yield relay.stop()
        yield target.port.stopListening()
    assert bytes(client.received) == CAPABILITIES + answer  # rewrite off: 250-STARTTLS shown as sent
    assert bytes(server.received) == b"EHLO me\r\nMAIL FROM:<a@example.net>\r\n"


@pytest.mark.parametrize("closer", ["client", "target"])
@pytest_twisted.inlineCallbacks
def test_either_side_closing_closes_the_other(closer: str) -> Any:
    target = Target(lambda: Peer(b"220 hi\r\n"))
    relay = MiddleboxRelay(target.host, target.number, [StartTLSStripper()])
    client = Peer(b"EHLO me\r\n250 no line end yet")  # a partial line the box holds: flushed on close
    try:
        yield connect(relay.start(), client)
        server = yield timely(target.accepted, "the relay connected to the target")
        yield timely(client.has(len(b"220 hi\r\n")), "the banner")
        yield timely(server.has(len(b"EHLO me\r\n")), "the client's complete line")
        (client if closer == "client" else server).transport.loseConnection()
        yield timely(client.gone, "the client's side closed")
        yield timely(server.gone, "the target's side closed")
    finally:
        yield relay.stop()
        yield target.port.stopListening()
    if closer == "client":
        assert bytes(server.received) == b"EHLO me\r\n250 no line end yet"
    assert relay.splices == set()


@pytest_twisted.inlineCallbacks
def test_an_unreachable_target_closes_the_client_with_a_note() -> Any:
    nobody = fresh()
    with socket.socket() as probe:
        probe.bind((nobody, 0))
        free = probe.getsockname()[1]
    relay = MiddleboxRelay(nobody, free, [StartTLSStripper()])
    client = Peer(b"EHLO me\r\n")
    try:
        yield connect(relay.start(), client)
        yield timely(client.gone, "the client's side closed")
    finally:
        yield relay.stop()
    assert client.received == b""
    assert len(relay.notes) == 1 and relay.notes[0].startswith(f"relay could not reach {nobody}:{free}: ")


@pytest.mark.parametrize("stalled", ["target", "client"])
@pytest_twisted.inlineCallbacks
def test_a_side_that_does_not_drain_stops_the_reading_of_the_other(stalled: str) -> Any:
    """One side floods through a raw non-blocking socket; the other does not read. The relay must stop taking
    the flood (the flooding socket then blocks for good) with at most one buffer's worth held, and pass every
    byte on once the stalled side reads again."""
    chunk = random.Random(3).randbytes(65_536)
    stream = chunk * 2  # the flood is ``chunk`` over and over; a send may take part of a piece
    flood_listener: socket.socket | None = None
    if stalled == "target":
        target = Target(lambda: Peer(paused=True))
    else:  # the target floods: a raw listening socket; the client is the Twisted side that does not read
        flood_listener = socket.socket()
        flood_listener.bind((fresh(), 0))
        flood_listener.listen(1)
        flood_listener.setblocking(False)
        target = None
    host, port = (target.host, target.number) if target else flood_listener.getsockname()  # type: ignore[union-attr]
    relay = MiddleboxRelay(host, port, [StartTLSStripper()])
    address = relay.start()
    flooder: socket.socket
    sent = blocked = 0
    try:
        if stalled == "target":
            assert target is not None
            flooder = socket.create_connection(address, timeout=WAIT)
            flooder.setblocking(False)
            sink = yield timely(target.accepted, "the relay connected to the target")
        else:
            sink = Peer(paused=True)
            yield connect(address, sink)
            assert flood_listener is not None
            for _ in range(1000):
                try:
                    flooder, _ = flood_listener.accept()
                    break
                except BlockingIOError:
                    yield task.deferLater(reactor, 0.01)
            flooder.setblocking(False)
        (splice,) = relay.splices
        for _ in range(1000):  # the target may accept before the relay's side of that connect is made
            if splice.server is not None:
                break
            yield task.deferLater(reactor, 0.01)
        assert splice.server is not None
        far = splice.client if stalled == "client" else splice.server
        near = splice.server if stalled == "client" else splice.client
        # Flood until the relay has stopped reading the flooder and the flooder cannot write for 20 turns
        # running; bounded in bytes (FLOOD_CAP) and in turns.
        for _ in range(20_000):
            try:
                sent += flooder.send(stream[sent % len(chunk) :][: len(chunk)])
                blocked = 0
            except BlockingIOError:
                blocked += 1
                yield task.deferLater(reactor, 0.005)
            assert buffered(far.transport) <= far.transport.bufferSize + 65_536 + MAX_HELD
            if (blocked >= 20 and near.paused) or sent > FLOOD_CAP:
                break
        assert near.paused and far.buffer.full, (sent, blocked)
        assert sent < FLOOD_CAP
        # The stalled side reads again: everything arrives, byte for byte.
        sink.transport.resumeProducing()
        flooder.shutdown(socket.SHUT_WR)
        yield timely(sink.gone, "the flood drained and the close passed on")
    finally:
        yield relay.stop()
        if target is not None:
            yield target.port.stopListening()
        if flood_listener is not None:
            flood_listener.close()
    flooder.close()
    assert bytes(sink.received) == (chunk * (sent // len(chunk) + 1))[:sent]


# -- end to end: smtplab run against a real Postfix, through the relay

STRIP_CASES = ("ATK-STRIP-01", "ATK-STRIP-02", "ATK-STRIP-03", "ATK-STRIP-04", "ATK-STRIP-05")
RUN_TIMEOUT = 120.0


@pytest.fixture(scope="module")
def postfixes(peer_root: Path, lab_ca: LabCA) -> Iterator[dict[str, PostfixPeer]]:
    """Postfix with smtpd_tls_security_level may and encrypt, each on its own loopback address."""
    require_kind("postfix")  # fails under CI=true, skips elsewhere
    peers = {}
    for level in ("may", "encrypt"):
        address = next_address()
        cert = lab_ca.issue(f"relay-{level}", ["postfix.peer.test", address])
        peers[level] = PostfixPeer(peer_root / level, address, None, level, cert.cert_pem, cert.key_pem)  # type: ignore[arg-type]
    try:
        for peer in peers.values():
            peer.start()
        yield peers
    finally:
        for peer in peers.values():
            peer.stop()


def _attacks(peer: PostfixPeer, policy: str, ca: LabCA, root: Path) -> tuple[dict[str, CaseRun], Path]:
    report = root / "reports" / f"{peer.tls_level}-{policy}"
    shutil.rmtree(report, ignore_errors=True)
    argv = ["run", "--target", f"{peer.address}:{peer.port}", "--policy", policy, "--ca", str(ca.ca_path),
            "--server-name", "postfix.peer.test", "--to", "postmaster@example.com",
            "ATK-STRIP", "ATK-EXPOSE"]  # fmt: skip
    outcome = _smtplab([*argv, "--report-dir", str(report)], root, RUN_TIMEOUT, report)
    assert outcome.returncode == 0, outcome.stdout[-3000:] + outcome.stderr[-2000:]
    return outcome.runs(), report


@pytest.mark.peer
def test_stripping_relay_downgrades_a_prefer_client_in_front_of_postfix_may(
    postfixes: dict[str, PostfixPeer], lab_ca: LabCA, peer_root: Path
) -> None:
    peer = postfixes["may"]
    runs, report = _attacks(peer, "preferred", lab_ca, peer_root)
    for case in STRIP_CASES:  # run through the relay, not "lab targets only"
        assert runs[case].verdict is not Verdict.UNIMPLEMENTED, runs[case].reason
    strip = runs["ATK-STRIP-01"]
    assert strip.verdict is Verdict.INFORMATIONAL, strip.reason
    assert strip.observed["starttls_advertised"] is False and strip.observed["delivered_plaintext"] is True
    assert strip.observed["plaintext_exposure"] == {"envelope": True, "body": True}
    assert "<-  250-XXXXXXXA" in strip.lines
    assert "=== middlebox: middlebox rewrote STARTTLS: 250-STARTTLS -> 250-XXXXXXXA" in strip.lines
    assert strip.capture is not None
    wire = (report / strip.capture).read_bytes()  # the client's side of the link, before the middlebox
    assert b"250-XXXXXXXA" in wire and b"250-STARTTLS" not in wire and b"SMTPLAB-MARKER-ATK-STRIP-01" in wire
    answered = runs["ATK-STRIP-03"]
    assert answered.observed["starttls_reply"] == 454 and answered.observed["delivered_plaintext"] is True
    assert runs["ATK-STRIP-02"].verdict is Verdict.OK and runs["ATK-STRIP-04"].verdict is Verdict.OK
    assert runs["ATK-EXPOSE-02"].verdict is Verdict.OK  # without a middlebox the same client stays in TLS
    # Postfix really took the downgraded mail, from the relay's address.
    assert peer.wait_for_log("client=unknown[127.254.0.1]")


@pytest.mark.peer
def test_under_postfix_encrypt_the_downgraded_client_cannot_deliver(
    postfixes: dict[str, PostfixPeer], lab_ca: LabCA, peer_root: Path
) -> None:
    runs, _ = _attacks(postfixes["encrypt"], "required", lab_ca, peer_root)
    for case in ("ATK-STRIP-01", "ATK-STRIP-03"):  # stripped or answered 454: the prefer client tries plaintext
        run = runs[case]
        assert run.verdict is Verdict.OK, run.reason
        assert run.observed["delivered"] is False and run.observed["replies"]["MAIL"] == 530
        assert run.observed["plaintext_exposure"]["body"] is False
    assert all(runs[case].verdict is Verdict.OK for case in STRIP_CASES), {c: runs[c].verdict for c in STRIP_CASES}
