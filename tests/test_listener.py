"""The listener in-process on the real reactor (pytest-twisted) and client-certificate checks on real sockets."""

from __future__ import annotations

import dataclasses
import shutil
import smtplib
import ssl
from pathlib import Path

import pytest
import pytest_twisted
from labruntime import lab_runtime
from serving import client_context, free_port, fresh_loopback, serve
from twisted.internet import defer, protocol, reactor

from lab.appliance.config import quick_appliance
from lab.policy.deadlines import Timeouts
from lab.policy.modes import Behaviour, TLSMode
from lab.smtp.listener import ApplianceRuntime
from lab.tls.certs import CertKey, LabCA

MESSAGE = "Subject: cert\r\n\r\nhello\r\n"


class Collect(protocol.Protocol):
    """Reads everything until the server closes."""

    def __init__(self, send: bytes = b"") -> None:
        self.data = b""
        self.send = send
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        if self.send:
            self.transport.write(self.send)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: object = None) -> None:
        self.done.callback(self.data)


def _runtime(tmp_path: Path, tls: TLSMode, **listener_changes: object) -> tuple[ApplianceRuntime, str, int]:
    host = fresh_loopback()
    port = free_port(host)
    appliance = quick_appliance(host, port, tls)
    listener = dataclasses.replace(appliance.listeners[0], **listener_changes)
    appliance = dataclasses.replace(appliance, listeners=(listener,))
    runtime = lab_runtime(appliance, reactor, tmp_path)
    return runtime, host, port


@pytest_twisted.inlineCallbacks
def test_idle_timeout_on_the_real_reactor(tmp_path: Path) -> None:
    runtime, host, port = _runtime(tmp_path, TLSMode.PREFERRED, timeouts=Timeouts(idle=0.3))
    listening = reactor.listenTCP(port, runtime.factory(runtime.appliance.listeners[0]), interface=host)
    try:
        client = Collect(b"EHLO idle.example\r\n")
        yield protocol.ClientCreator(reactor, lambda: client).connectTCP(host, port)
        data = yield client.done
        assert data.startswith(b"220 esa.lab.example ")
        assert data.endswith(b"421 4.4.2 Idle timeout, closing connection\r\n")
        assert any("idle timeout" in line for line in runtime.maillog.lines)
    finally:
        yield listening.stopListening()


@pytest_twisted.inlineCallbacks
def test_tcprefuse_closes_without_a_banner(tmp_path: Path) -> None:
    runtime, host, port = _runtime(tmp_path, TLSMode.NO)
    listener = runtime.appliance.listeners[0]
    accepted = listener.policies["ACCEPTED"]
    policies = {**listener.policies, "ACCEPTED": dataclasses.replace(accepted, behaviour=Behaviour.TCPREFUSE)}
    listener = dataclasses.replace(listener, policies=policies)
    listening = reactor.listenTCP(port, runtime.factory(listener), interface=host)
    try:
        client = Collect()
        yield protocol.ClientCreator(reactor, lambda: client).connectTCP(host, port)
        data = yield client.done
        assert data == b""
        assert any("TCPREFUSE" in line for line in runtime.maillog.lines)
    finally:
        yield listening.stopListening()


def _tls_client(server_host: str, port: int, cert: tuple[Path, Path] | None) -> smtplib.SMTP:
    context = client_context()
    if cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    client = smtplib.SMTP(server_host, port, local_hostname="client.example", timeout=10)
    client.starttls(context=context)
    client.ehlo()
    return client


def _write_cert(path: Path, certkey: CertKey) -> tuple[Path, Path]:
    cert, key = path.with_suffix(".pem"), path.with_suffix(".key")
    cert.write_bytes(certkey.cert_pem)
    key.write_bytes(certkey.key_pem)
    return cert, key


@pytest.mark.parametrize("mode", ["required", "preferred"])
def test_verify_client_certificate_on_real_sockets(tmp_path: Path, mode: str) -> None:
    state = tmp_path / "run" / "state"
    trusted = _write_cert(tmp_path / "trusted", LabCA(state).issue("client", ["client.example"], client=True))
    untrusted = _write_cert(
        tmp_path / "untrusted", LabCA.untrusted(state).issue("rogue", ["rogue.example"], client=True)
    )
    with serve(tmp_path / "run", "--tls", mode, "--verify-client") as server:
        with _tls_client(server.host, server.port, trusted) as client:
            assert client.sendmail("a@sender.example", ["bob@example.com"], MESSAGE) == {}
        with _tls_client(server.host, server.port, untrusted) as client:
            assert client.docmd("MAIL FROM:<a@sender.example>") == (
                554,
                b"5.7.0 Command refused due to lack of security",
            )
        with _tls_client(server.host, server.port, None) as client:
            code = client.docmd("MAIL FROM:<a@sender.example>")[0]
            assert code == (554 if mode == "required" else 250)
        with smtplib.SMTP(server.host, server.port, local_hostname="c.example", timeout=10) as plain:
            plain.ehlo()
            assert plain.docmd("MAIL FROM:<a@sender.example>")[0] == (530 if mode == "required" else 250)
        assert len(server.maildir_new()) == 1
        server.wait_log("client certificate")


def test_spool_failure_answers_451_and_keeps_serving(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with serve(run, "--tls", "no") as server:  # the spool is checked at start; it breaks while serving
        shutil.rmtree(server.spool / "Inboundmail")
        (server.spool / "Inboundmail").write_text("a file where the Maildir should be")
        with smtplib.SMTP(server.host, server.port, local_hostname="c.example", timeout=10) as client:
            with pytest.raises(smtplib.SMTPDataError) as refused:
                client.sendmail("a@sender.example", ["bob@example.com"], MESSAGE)
            assert refused.value.smtp_code == 451
            assert client.noop()[0] == 250
        server.wait_log("spool error")


def test_tls_versions_below_minimum_are_refused(tmp_path: Path) -> None:
    with serve(tmp_path, "--tls", "required") as server:
        context = client_context()
        context.minimum_version = ssl.TLSVersion.TLSv1  # deprecated on purpose: this client is the "old TLS" one
        context.maximum_version = ssl.TLSVersion.TLSv1_1
        context.set_ciphers("ALL:@SECLEVEL=0")
        client = smtplib.SMTP(server.host, server.port, local_hostname="c.example", timeout=10)
        with pytest.raises((ssl.SSLError, smtplib.SMTPServerDisconnected, ConnectionError)):
            client.starttls(context=context)
        client.close()
        lines = server.wait_log("TLS failed")
        assert any("version" in line.lower() or "protocol" in line.lower() for line in lines if "TLS failed" in line)
