"""Real peer MTAs: Postfix at smtpd_tls_security_level none/may/encrypt and aiosmtpd plain/tls/require.

The peers start once per module, all at the same time (which also shows that several Postfix instances run side
by side), each on its own 127.25.x.y address and a free port. Every test talks to them with Python's smtplib and
checks reply codes and what lands on disk; the last tests stop them and check that no process is left.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from peers import (
    LoopbackAddresses,
    Peer,
    aiosmtpd_peer,
    check_searchable,
    free_port,
    next_address,
    pid_running,
    postfix,
    require_kind,
    require_peer,
    start_all,
    stop_all,
    unavailable_reason,
)
from peers.aiosmtpd_peer import AiosmtpdPeer
from peers.postfix import PostfixPeer

from lab.errors import BadInput, HarnessError
from lab.tls.certs import LabCA

DOMAIN = "example.com"


@dataclass(frozen=True)
class Expect:
    """What smtplib must observe before TLS: is STARTTLS listed, what MAIL and STARTTLS are answered."""

    kind: str
    setting: str
    advertised: bool
    mail_before_tls: int
    starttls: int


CASES = {
    "postfix-none": Expect("postfix", "none", False, 250, 502),
    "postfix-may": Expect("postfix", "may", True, 250, 220),
    "postfix-encrypt": Expect("postfix", "encrypt", True, 530, 220),
    "aiosmtpd-plain": Expect("aiosmtpd", "plain", False, 250, 454),
    "aiosmtpd-tls": Expect("aiosmtpd", "tls", True, 250, 220),
    "aiosmtpd-require": Expect("aiosmtpd", "require", True, 530, 220),
}
TLS_CASES = [name for name, e in CASES.items() if e.starttls == 220]
PLAIN_CASES = [name for name, e in CASES.items() if e.mail_before_tls == 250]
POSTFIX_CASES = [name for name, e in CASES.items() if e.kind == "postfix"]


def _build(name: str, expect: Expect, root: Path, ca: LabCA) -> Peer:
    address = next_address()
    hostname = f"{expect.kind}.peer.test"
    cert = ca.issue(name, [hostname, address])
    if expect.kind == "postfix":
        return PostfixPeer(root / name, address, None, expect.setting, cert.cert_pem, cert.key_pem)  # type: ignore[arg-type]
    return AiosmtpdPeer(root / name, address, None, expect.setting, cert.cert_pem, cert.key_pem)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def fleet(peer_root: Path, lab_ca: LabCA) -> Iterator[dict[str, Peer]]:
    """Every available peer, started together; stopped together at the end of the module."""
    peers = {
        name: _build(name, expect, peer_root, lab_ca)
        for name, expect in CASES.items()
        if unavailable_reason(expect.kind) is None
    }
    if postfix.available():
        address = next_address()
        cert = lab_ca.issue("postfix-verify", ["postfix.peer.test", address])
        peers["postfix-encrypt-verify"] = PostfixPeer(
            peer_root / "postfix-encrypt-verify", address, None, "encrypt", cert.cert_pem, cert.key_pem,
            verify_client=True, client_ca_pem=lab_ca.ca_pem,
        )  # fmt: skip
    start_all(list(peers.values()))
    yield peers
    stop_all(list(peers.values()))


@pytest.fixture(params=list(CASES))
def case(request: pytest.FixtureRequest, fleet: dict[str, Peer]) -> tuple[Peer, Expect]:
    """One peer, running (restarted if an earlier test stopped it), and what it must do."""
    expect = CASES[request.param]
    require_kind(expect.kind)
    peer = fleet[request.param]
    peer.start()
    return peer, expect


def _named(names: list[str]) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("case", names, indirect=True)


@pytest.fixture(scope="module")
def client_tls(lab_ca: LabCA) -> ssl.SSLContext:
    """Verifies the peer against the lab CA and its IP address (the certificates carry the address as a SAN)."""
    return ssl.create_default_context(cafile=str(lab_ca.ca_path))


def _smtp(peer: Peer) -> smtplib.SMTP:
    client = smtplib.SMTP(peer.address, peer.port, local_hostname="client.peer.test", timeout=10)
    client.ehlo()
    return client


def _deliver(client: smtplib.SMTP, token: str) -> int:
    assert client.mail("sender@example.net")[0] == 250
    assert client.rcpt(f"user@{DOMAIN}")[0] == 250
    body = f"Subject: {token}\r\nMessage-ID: <{token}@client.peer.test>\r\n\r\nbody {token}\r\n"
    return client.data(body.encode())[0]


def _tls_marker(peer: Peer, message: bytes) -> bool:
    """Did the peer record that TLS carried the message (Postfix: Received header; aiosmtpd: X-Smtplab-TLS)?"""
    if isinstance(peer, PostfixPeer):
        return b"(using TLSv1." in message
    return f"{aiosmtpd_peer.TLS_HEADER}: TLSv1.".encode() in message


# -- talking to each peer ---------------------------------------------------------------------------------------


@pytest.mark.peer
def test_banner_and_starttls_advertisement(case: tuple[Peer, Expect]) -> None:
    peer, expect = case
    assert peer.banner.startswith(f"220 {expect.kind}.peer.test")
    with _smtp(peer) as client:
        assert client.has_extn("starttls") is expect.advertised


@pytest.mark.peer
def test_mail_before_starttls(case: tuple[Peer, Expect]) -> None:
    peer, expect = case
    with _smtp(peer) as client:
        code, text = client.mail("sender@example.net")
        assert code == expect.mail_before_tls, text
        if code == 530:
            assert b"STARTTLS" in text


@pytest.mark.peer
@_named([n for n in CASES if n not in TLS_CASES])
def test_starttls_refused_without_tls(case: tuple[Peer, Expect]) -> None:
    peer, expect = case
    with _smtp(peer) as client:
        assert client.docmd("STARTTLS")[0] == expect.starttls
        assert client.noop()[0] == 250  # the session goes on in plaintext


@pytest.mark.peer
@_named(TLS_CASES)
def test_starttls_then_delivery_inside_tls(case: tuple[Peer, Expect], client_tls: ssl.SSLContext) -> None:
    peer, expect = case
    token = f"tls-{expect.kind}-{expect.setting}"
    with _smtp(peer) as client:
        assert client.starttls(context=client_tls)[0] == 220
        sock = client.sock
        assert isinstance(sock, ssl.SSLSocket)
        peer_cert = sock.getpeercert()
        assert peer_cert is not None
        assert ("DNS", f"{expect.kind}.peer.test") in peer_cert["subjectAltName"]
        client.ehlo()
        assert not client.has_extn("starttls")  # RFC 3207 4.2: never offered again inside TLS
        assert _deliver(client, token) == 250
    message = peer.wait_for_message(token.encode())
    assert message is not None, f"{token} never reached {peer.maildir}"
    assert _tls_marker(peer, message)


@pytest.mark.peer
@_named(PLAIN_CASES)
def test_plaintext_delivery(case: tuple[Peer, Expect]) -> None:
    peer, expect = case
    token = f"plain-{expect.kind}-{expect.setting}"
    with _smtp(peer) as client:
        assert _deliver(client, token) == 250
    message = peer.wait_for_message(token.encode())
    assert message is not None, f"{token} never reached {peer.maildir}"
    assert not _tls_marker(peer, message)


@pytest.mark.peer
@_named(POSTFIX_CASES)
def test_postfix_relays_nothing(case: tuple[Peer, Expect], client_tls: ssl.SSLContext) -> None:
    peer, expect = case
    with _smtp(peer) as client:
        if expect.mail_before_tls != 250:
            client.starttls(context=client_tls)
            client.ehlo()
        assert client.mail("sender@example.net")[0] == 250
        code, text = client.rcpt("someone@elsewhere.test")
        assert code == 554 and b"Relay access denied" in text


@pytest.mark.peer
@_named(["postfix-may", "postfix-encrypt"])
def test_postfix_logs_tls_to_its_own_maillog(case: tuple[Peer, Expect], client_tls: ssl.SSLContext) -> None:
    peer, _ = case
    assert isinstance(peer, PostfixPeer)
    with _smtp(peer) as client:
        client.starttls(context=client_tls)
        client.ehlo()
    assert peer.wait_for_log("TLS connection established from")
    assert f"configuration {peer.config_dir}" in peer.maillog()


@pytest.mark.peer
def test_postfix_instances_run_side_by_side(fleet: dict[str, Peer]) -> None:
    require_kind("postfix")
    running = [p for p in fleet.values() if isinstance(p, PostfixPeer)]
    start_all(running)  # no-op for those already running
    assert len(running) >= 3 and all(p.running for p in running)
    masters = {p.pid for p in running}
    assert len(masters) == len(running)
    assert len({(p.address, p.port) for p in running}) == len(running)
    for peer in running:
        assert f"smtpd_tls_security_level={peer.tls_level})" in peer.banner
        log = peer.maillog()
        assert all(f"configuration {o.config_dir}" not in log for o in running if o is not peer)


@pytest.mark.peer
def test_postfix_verify_client_requires_a_client_certificate(
    fleet: dict[str, Peer], lab_ca: LabCA, client_tls: ssl.SSLContext, peer_root: Path
) -> None:
    require_kind("postfix")
    peer = fleet["postfix-encrypt-verify"]
    assert isinstance(peer, PostfixPeer)
    peer.start()
    client = _smtp(peer)
    client.starttls(context=client_tls)
    code, text = client.ehlo()  # no client certificate: smtpd_tls_req_ccert ends the session after the handshake
    assert (code, b"No client certificate presented" in text) == (421, True)
    client.close()
    assert peer.wait_for_log("abort: TLS from")
    cert = lab_ca.issue("client", ["client.peer.test"], client=True)
    (peer_root / "client.pem").write_bytes(cert.cert_pem)
    (peer_root / "client.key").write_bytes(cert.key_pem)
    with_cert = ssl.create_default_context(cafile=str(lab_ca.ca_path))
    with_cert.load_cert_chain(peer_root / "client.pem", peer_root / "client.key")
    with _smtp(peer) as client:
        client.starttls(context=with_cert)
        client.ehlo()
        assert _deliver(client, "verified-client") == 250
    assert peer.wait_for_message(b"verified-client") is not None


# -- failure to start -------------------------------------------------------------------------------------------


@pytest.mark.peer
@pytest.mark.parametrize("kind", ["postfix", "aiosmtpd"])
def test_port_in_use_is_a_harness_error_and_leaves_nothing(kind: str, peer_root: Path) -> None:
    require_kind(kind)
    address = next_address()
    with socket.socket() as squatter:
        squatter.bind((address, 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        peer: Peer
        if kind == "postfix":
            peer = PostfixPeer(peer_root / f"busy-{kind}", address, port, "none", start_timeout=10)
        else:
            peer = AiosmtpdPeer(peer_root / f"busy-{kind}", address, port, "plain", start_timeout=10)
        with pytest.raises(HarnessError, match=f"{address}:{port}"):
            peer.start()
    assert peer.last_pid is not None and not pid_running(peer.last_pid)
    assert peer.pid is None


# -- stopping (kept last: the case fixture restarts a stopped peer, so the order only saves time) ----------------


@pytest.mark.peer
def test_stop_leaves_no_process_and_closes_the_port(case: tuple[Peer, Expect]) -> None:
    peer, expect = case
    pids = peer.pids()
    assert pids and pids[0] == peer.pid
    if expect.kind == "postfix":
        assert len(pids) > 1  # the master and the daemons it spawned (qmgr, pickup, smtpd, ...)
    peer.stop()
    assert peer.pid is None and not peer.running
    assert [pid for pid in pids if pid_running(pid)] == []
    with pytest.raises(OSError), socket.create_connection((peer.address, peer.port), timeout=2):
        pass
    peer.stop()  # a second stop is harmless


# -- helpers that need no peer ----------------------------------------------------------------------------------


def test_require_peer_skips_locally_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    require_peer("present", True)  # returns quietly
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="peer nothing is not available: not installed"):
        require_peer("nothing", False, "not installed")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_peer("nothing", False)


def test_free_port_is_bindable_and_addresses_are_distinct() -> None:
    pool = LoopbackAddresses("127.30.0.0/30")
    taken = [pool.take(), pool.take()]
    assert taken == ["127.30.0.1", "127.30.0.2"]
    with pytest.raises(HarnessError):
        pool.take()
    with pytest.raises(BadInput):
        LoopbackAddresses("192.168.2.0/24")
    port = free_port(taken[0])
    assert port >= 1024
    with socket.socket() as sock:
        sock.bind((taken[0], port))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"tls_level": "maybe"}, "tls_level"),
        ({"tls_level": "encrypt"}, "cert_pem"),
        ({"address": "192.168.2.1"}, "address"),
        ({"port": 25}, "port"),
        ({"tls_level": "none", "hostname": "bad name\nrelayhost = x"}, "hostname"),
    ],
)
def test_postfix_peer_rejects_bad_settings(kwargs: dict[str, object], field: str, tmp_path: Path) -> None:
    with pytest.raises(BadInput) as err:
        PostfixPeer(tmp_path, **kwargs)  # type: ignore[arg-type]
    assert err.value.field == field


def test_aiosmtpd_peer_rejects_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="needs a certificate"):
        AiosmtpdPeer(tmp_path, mode="require")
    with pytest.raises(BadInput, match=r"outside 127\.0\.0\.0/8"):
        AiosmtpdPeer(tmp_path, address="198.51.100.7")
    assert aiosmtpd_peer.main(["--host", "198.51.100.7", "--port", "2525", "--mode", "plain", "--maildir", "x"]) == 3


def test_postfix_main_cf_isolates_the_instance(tmp_path: Path) -> None:
    peer = PostfixPeer(
        tmp_path / "p", "127.25.9.9", 2525, "encrypt", b"cert", b"key", verify_client=True, client_ca_pem=b"ca"
    )
    main_cf = dict(line.split(" = ", 1) for line in peer.main_cf().splitlines() if " = " in line)
    assert main_cf["queue_directory"] == str(tmp_path / "p" / "queue")
    assert main_cf["default_transport"].startswith("error:")
    assert "relayhost =" in peer.main_cf().splitlines()
    assert main_cf["smtpd_tls_security_level"] == "encrypt"
    assert main_cf["smtpd_tls_req_ccert"] == "yes"
    assert peer.master_cf().splitlines()[0] == "127.25.9.9:2525 inet n - n - - smtpd"


def test_workdir_under_a_private_directory_is_refused(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(HarnessError, match="not searchable"):
        check_searchable(private)
