"""The misbehaving receiving MTA: each STARTTLS mode as it looks on the wire, driven by the client engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet import task
from twisted.internet.protocol import ClientFactory, Protocol

from lab.errors import BadInput
from lab.net.capture import Direction
from lab.net.memory import MemoryNetwork
from lab.smtp.client import ClientRecord, ScriptedClient
from lab.smtp.remote_mta import GARBAGE, HANDSHAKE_FAILURE_ALERT, RemoteMTAFactory
from lab.smtp.steps import steps_from_data
from lab.tls.certs import LabCA
from lab.tls.tlsctx import ServerTLS, lab_client_tls
from lab.yamlsource import parse_yaml

STARTTLS_THEN_EHLO = "[{ehlo: c.example}, {starttls: {}}, {ehlo: c.example}, quit]"


Run = tuple[ClientRecord, MemoryNetwork, RemoteMTAFactory]


def run(script: str, tmp_path: Path, mode: str = "ok", **kw: Any) -> Run:
    net = MemoryNetwork()
    factory = RemoteMTAFactory("mx.remote.test", starttls=mode, clock=net.clock, **kw)
    net.listen("192.168.2.1", 25, factory)
    client = ScriptedClient(
        steps_from_data(parse_yaml(script, "t.yaml")),
        clock=net.clock,
        connect=lambda f: net.connect("198.51.100.7", "192.168.2.1", 25, f),
        tls_factory=lab_client_tls(state_dir=tmp_path),
    )
    record = net.run_until(client.run(), timeout=3600)
    net.run()
    return record, net, factory


def s2c_segments(net: MemoryNetwork) -> list[bytes]:
    return [s.data for s in net.capture.flows[0].segments if s.direction is Direction.S2C]


def test_absent_does_not_advertise_and_refuses_starttls(tmp_path: Path) -> None:
    record, _, _ = run(STARTTLS_THEN_EHLO, tmp_path, "absent")
    assert record.observed["starttls_advertised"] is False
    assert record.observed["starttls_reply"] == 502 and record.observed["tls"] is False


def test_454_advertises_and_then_refuses(tmp_path: Path) -> None:
    record, _, _ = run(STARTTLS_THEN_EHLO, tmp_path, "454")
    assert record.observed["starttls_advertised"] is True
    assert record.observed["starttls_reply"] == 454
    assert record.observed["replies"]["EHLO#2"] == 250  # still plaintext: no /tls suffix


def test_ok_completes_tls_and_hides_starttls_inside_it(tmp_path: Path) -> None:
    record, _, factory = run(STARTTLS_THEN_EHLO, tmp_path)
    assert record.observed["tls"] is True
    assert factory.sessions[0].tls is True and factory.sessions[0].tls_version == "TLSv1.3"
    assert "<~  250 STARTTLS" not in record.transcript and "<-  250 STARTTLS" in record.transcript


def test_response_injection_sends_220_and_250_in_one_write(tmp_path: Path) -> None:
    _, net, _ = run(STARTTLS_THEN_EHLO, tmp_path, "response-injection")
    assert b"220 2.0.0 Ready to start TLS\r\n250 2.0.0 injected\r\n" in s2c_segments(net)


def test_garbage_after_220_answers_the_clienthello_in_plaintext(tmp_path: Path) -> None:
    record, net, _ = run(STARTTLS_THEN_EHLO, tmp_path, "garbage-after-220")
    assert s2c_segments(net)[-1] == GARBAGE
    assert record.observed["tls"] is False and record.observed["tls_error"] == "wrong version number"


def test_handshake_fail_sends_a_fatal_alert(tmp_path: Path) -> None:
    record, net, _ = run(STARTTLS_THEN_EHLO, tmp_path, "handshake-fail")
    assert s2c_segments(net)[-1] == HANDSHAKE_FAILURE_ALERT
    assert record.observed["tls_error"] == "tls alert handshake failure"
    assert record.observed["closed_by"] == "server"


def test_plaintext_behind_starttls_is_discarded_unless_vulnerable(tmp_path: Path) -> None:
    script = "[{ehlo: c.example}, {starttls: {inject: 'MAIL FROM:<evil@example.net>\\r\\n'}}, {ehlo: c.example}]"
    _, _, safe = run(script, tmp_path)
    assert all("evil" not in line for _, line in safe.sessions[0].commands)
    record, _, vulnerable = run(script, tmp_path, injection_vulnerable=True)
    assert (True, "MAIL FROM:<evil@example.net>") in vulnerable.sessions[0].commands  # executed inside TLS
    assert record.observed["injection_executed"] is True


def test_message_is_kept_with_its_tls_state(tmp_path: Path) -> None:
    script = '[{tls_policy: require}, {mail: {from: a@example.net, to: b@example.com, body: ".dot\\nline"}}, quit]'
    _, _, factory = run(script, tmp_path)
    message = factory.messages[0]
    assert message.tls is True and message.mail_from == "a@example.net" and message.rcpt_to == ["b@example.com"]
    assert b"\r\n.dot\r\nline\r\n" in message.data  # dot-stuffing undone


def test_a_lab_certificate_and_a_client_certificate(tmp_path: Path) -> None:
    ca = LabCA(tmp_path)
    server = ServerTLS(ca.issue("mx", ["mx.remote.test"]), request_client_cert=True, client_ca_pems=[ca.ca_pem])
    script = "[{ehlo: c.example}, {starttls: {tls: {client_cert: untrusted}}}, quit]"
    _, _, factory = run(script, tmp_path, tls_server=server)
    assert factory.sessions[0].client_cert_subject == "CN=client.example.net"


def test_idle_timeout_uses_the_given_clock() -> None:
    clock = task.Clock()
    net = MemoryNetwork(clock)
    factory = RemoteMTAFactory("mx.remote.test", clock=clock, idle_timeout=60)
    net.listen("192.168.2.1", 25, factory)
    net.connect("198.51.100.7", "192.168.2.1", 25, ClientFactory.forProtocol(Protocol))  # connects, never speaks
    net.run()
    assert 60 <= clock.seconds() < 61
    assert factory.sessions[0].closed is True


def test_unknown_mode_is_bad_input() -> None:
    with pytest.raises(BadInput, match="'sometimes' is not one of ok, absent"):
        RemoteMTAFactory("mx.remote.test", starttls="sometimes")
