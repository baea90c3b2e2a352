"""The named client behaviours: the fallback table's decisions as they appear on the wire.

Against the misbehaving remote MTA (each STARTTLS problem on demand) and against the appliance listener over the
in-memory carrier (No / Preferred / Required, real TLS, virtual time).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.protocol import ServerFactory

from lab.appliance.config import quick_appliance
from lab.appliance.maillog import MailLog
from lab.appliance.model import Certificate
from lab.appliance.spool import Spool
from lab.errors import BadInput
from lab.net.loopback import LoopbackNetwork
from lab.net.memory import MemoryNetwork
from lab.net.middlebox import StartTLSStripper
from lab.policy.fallback import ClientTLS
from lab.policy.modes import TLSMode
from lab.smtp.behaviours import BEHAVIOURS, behaviour_steps
from lab.smtp.client import ClientRecord, ScriptedClient
from lab.smtp.listener import ApplianceRuntime
from lab.smtp.remote_mta import RemoteMTAFactory
from lab.smtp.steps import TLSPolicy
from lab.tls.certs import LabCA
from lab.tls.tlsctx import ServerTLS, lab_client_tls

SERVER, CLIENT = "192.168.2.1", "198.51.100.7"
MARKER = "smtplab-marker-7f3a"


def run(name: str, factory: ServerFactory, net: MemoryNetwork, tmp_path: Path, **tls: Any) -> ClientRecord:
    steps = behaviour_steps(
        name, ehlo="mx.example.net", mail_from="a@example.net", rcpt_to="b@example.com", body_marker=MARKER
    )
    net.listen(SERVER, 25, factory)
    client = ScriptedClient(
        steps,
        clock=net.clock,
        connect=lambda f: net.connect(CLIENT, SERVER, 25, f),
        tls_factory=lab_client_tls(state_dir=tmp_path / "client", **tls),
    )
    record = net.run_until(client.run(), timeout=3600)
    net.run()
    return record


def remote(name: str, mode: str, tmp_path: Path, **kw: Any) -> tuple[ClientRecord, RemoteMTAFactory]:
    net = MemoryNetwork()
    factory = RemoteMTAFactory("mx.remote.test", starttls=mode, clock=net.clock, **kw)
    return run(name, factory, net, tmp_path), factory


def sent(record: ClientRecord) -> list[str]:
    """The command lines the client sent (message bodies left out)."""
    out = []
    for line in record.transcript:
        if line.startswith((" -> ", " ~> ")):
            text = line[4:]
            if text.split(" ")[0].isupper() and ":" not in text.split(" ")[0]:
                out.append(text)
    return out


# -- the catalogue


def test_every_behaviour_has_steps_and_a_description() -> None:
    for name, description in BEHAVIOURS.items():
        steps = behaviour_steps(name, ehlo="h.example", mail_from="a@x.example", rcpt_to=["b@y.example"])
        assert steps and description
    assert set(BEHAVIOURS) >= {"skip", "prefer", "prefer-strict", "require", "require-verify"}


def test_tls_decisions_go_through_the_one_rule_table() -> None:
    for name in ("skip", "prefer", "prefer-strict", "require", "require-verify"):
        first = behaviour_steps(name, ehlo="h.example", mail_from="a@x.example", rcpt_to="b@y.example")[0]
        assert isinstance(first, TLSPolicy) and first.behaviour is ClientTLS(name)
    verify = behaviour_steps("require-verify", ehlo="h", mail_from="a@x", rcpt_to="b@y")[0]
    assert isinstance(verify, TLSPolicy) and verify.tls.verify is True


def test_unknown_behaviour_is_bad_input() -> None:
    with pytest.raises(BadInput, match="unknown client behaviour 'maybe'"):
        behaviour_steps("maybe", ehlo="h", mail_from="a@x", rcpt_to="b@y")


# -- the fallback table on the wire (remote MTA)


def test_prefer_after_454_sends_mail_in_plaintext(tmp_path: Path) -> None:
    record, factory = remote("prefer", "454", tmp_path)
    assert sent(record)[:3] == ["EHLO mx.example.net", "STARTTLS", "MAIL FROM:<a@example.net>"]
    assert " -> MAIL FROM:<a@example.net>" in record.transcript
    assert record.observed["fell_back"] is True and record.observed["delivered_plaintext"] is True
    assert factory.messages[0].tls is False


def test_prefer_strict_after_454_sends_quit(tmp_path: Path) -> None:
    record, factory = remote("prefer-strict", "454", tmp_path)
    assert sent(record) == ["EHLO mx.example.net", "STARTTLS", "QUIT"]
    assert record.observed["aborted"] is True and not factory.messages


def test_require_without_starttls_sends_quit_and_nothing_else(tmp_path: Path) -> None:
    record, factory = remote("require", "absent", tmp_path)
    assert sent(record) == ["EHLO mx.example.net", "QUIT"]
    assert [line for _, line in factory.sessions[0].commands] == ["EHLO mx.example.net", "QUIT"]
    assert record.observed["aborted"] is True and record.observed["starttls_advertised"] is False


def test_prefer_strict_without_starttls_delivers_in_plaintext(tmp_path: Path) -> None:
    record, _ = remote("prefer-strict", "absent", tmp_path)
    assert record.observed["delivered_plaintext"] is True and record.observed["fell_back"] is True


def test_prefer_after_a_failed_handshake_retries_in_plaintext_on_a_new_connection(tmp_path: Path) -> None:
    record, factory = remote("prefer", "handshake-fail", tmp_path)
    assert record.observed["connections"] == 2
    assert record.observed["delivered_plaintext"] is True and record.observed["fell_back"] is True
    assert record.observed["tls"] is False and record.observed["tls_error"] == "tls alert handshake failure"
    assert [line for _, line in factory.sessions[1].commands][0:2] == [
        "EHLO mx.example.net",
        "MAIL FROM:<a@example.net>",
    ]
    assert len(factory.messages) == 1 and factory.messages[0].tls is False


def test_require_after_a_failed_handshake_gives_up_on_the_one_connection(tmp_path: Path) -> None:
    record, factory = remote("require", "handshake-fail", tmp_path)
    assert record.observed["connections"] == 1 and record.observed["aborted"] is True
    assert not factory.messages


def test_skip_never_sends_starttls(tmp_path: Path) -> None:
    record, factory = remote("skip", "ok", tmp_path)
    assert "STARTTLS" not in sent(record)
    assert record.observed["starttls_advertised"] is True and "fell_back" not in record.observed
    assert factory.messages[0].tls is False


def test_response_injection_is_discarded_by_every_tls_behaviour(tmp_path: Path) -> None:
    for name in ("prefer", "require"):
        record, factory = remote(name, "response-injection", tmp_path)
        assert record.observed["response_injection_discarded"] is True
        assert record.observed["delivered_tls"] is True and factory.messages[0].tls is True


def test_require_verify_quits_inside_tls_on_the_demo_certificate(tmp_path: Path) -> None:
    record, factory = remote("require-verify", "ok", tmp_path)
    assert record.observed["tls"] is True and record.observed["server_cert_verified"] is False
    assert record.transcript[-2:] == [" ~> QUIT", "<~  221 2.0.0 Bye"]
    assert record.observed["aborted"] is True and not factory.messages


def test_require_verify_delivers_to_a_certificate_that_verifies(tmp_path: Path) -> None:
    ca = LabCA(tmp_path / "ca")
    server = ServerTLS(ca.issue("mx", ["mx.remote.test"]))
    net = MemoryNetwork()
    factory = RemoteMTAFactory("mx.remote.test", tls_server=server, clock=net.clock)
    record = run("require-verify", factory, net, tmp_path, server_name="mx.remote.test", trust_pems=[ca.ca_pem])
    assert record.observed["server_cert_verified"] is True and record.observed["delivered_tls"] is True


def test_require_verify_refuses_a_certificate_for_another_name(tmp_path: Path) -> None:
    ca = LabCA(tmp_path / "ca")
    server = ServerTLS(ca.issue("other", ["other.example"]))
    net = MemoryNetwork()
    factory = RemoteMTAFactory("mx.remote.test", tls_server=server, clock=net.clock)
    record = run("require-verify", factory, net, tmp_path, server_name="mx.remote.test", trust_pems=[ca.ca_pem])
    assert record.observed["server_cert_verified"] is False and record.observed["delivered"] is False


# -- against the appliance listener


class Lab:
    def __init__(self, tmp_path: Path, mode: TLSMode, **appliance: Any) -> None:
        self.net = MemoryNetwork()
        self.tmp_path = tmp_path
        app = quick_appliance(SERVER, 25, mode, **appliance)
        self.log = MailLog(None, clock=self.net.clock.seconds)
        self.runtime = ApplianceRuntime(
            app, clock=self.net.clock, maillog=self.log, spool=Spool(tmp_path / "spool"), state_dir=tmp_path / "state"
        )
        self.factory = self.runtime.factory(app.listeners[0])

    def run(self, name: str, **tls: Any) -> ClientRecord:
        return run(name, self.factory, self.net, self.tmp_path, **tls)

    def logged(self, text: str) -> bool:
        return any(text in line for line in self.log.lines)

    def spooled(self) -> list[bytes]:
        new = self.tmp_path / "spool" / "Inboundmail" / "new"
        return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []


def test_listener_required_refuses_skip_and_delivers_require(tmp_path: Path) -> None:
    skip = Lab(tmp_path / "a", TLSMode.REQUIRED).run("skip")
    assert skip.observed["replies"]["MAIL"] == 530 and skip.observed["delivered"] is False
    lab = Lab(tmp_path / "b", TLSMode.REQUIRED)
    require = lab.run("require")
    assert require.observed["delivered_tls"] is True
    assert any(MARKER.encode() in message for message in lab.spooled())


def test_listener_no_makes_prefer_fall_back_and_require_give_up(tmp_path: Path) -> None:
    prefer = Lab(tmp_path / "a", TLSMode.NO).run("prefer")
    assert prefer.observed["starttls_advertised"] is False
    assert prefer.observed["fell_back"] is True and prefer.observed["delivered_plaintext"] is True
    require = Lab(tmp_path / "b", TLSMode.NO).run("require")
    assert require.observed["aborted"] is True and "STARTTLS" not in sent(require)


def test_listener_preferred_logs_the_failed_handshakes_of_fail_variants(tmp_path: Path) -> None:
    for i, name in enumerate(("fail-old-tls", "fail-no-shared-cipher", "fail-abort-handshake")):
        lab = Lab(tmp_path / str(i), TLSMode.PREFERRED)
        record = lab.run(name)
        assert record.observed["tls"] is False and record.observed["delivered"] is False, name
        assert lab.logged("TLS failed"), name


def test_listener_preferred_after_plaintext_instead_of_clienthello(tmp_path: Path) -> None:
    lab = Lab(tmp_path, TLSMode.PREFERRED)
    record = lab.run("fail-plaintext-after-220")
    assert record.observed["delivered"] is False and record.observed["closed_by"] == "server"
    assert lab.logged("TLS failed")


def test_listener_discards_commands_pipelined_behind_starttls(tmp_path: Path) -> None:
    lab = Lab(tmp_path, TLSMode.PREFERRED)
    record = lab.run("pipeline-behind-starttls")
    assert record.observed["injection_executed"] is False and record.observed["delivered_tls"] is True
    assert lab.logged("STARTTLS command injection: discarded")


def test_listener_answers_the_misbehaving_clients(tmp_path: Path) -> None:
    replies = {
        name: Lab(tmp_path / name, TLSMode.REQUIRED).run(name).observed["replies"]
        for name in ("skip-ehlo-after-tls", "starttls-with-argument", "starttls-twice", "helo-instead-of-ehlo")
    }
    assert replies["skip-ehlo-after-tls"]["MAIL/tls"] == 503
    assert replies["starttls-with-argument"]["STARTTLS"] == 501
    assert replies["starttls-twice"]["STARTTLS/tls"] == 503
    assert replies["helo-instead-of-ehlo"]["HELO"] == 530 and replies["helo-instead-of-ehlo"]["MAIL"] == 530


def test_listener_required_refuses_mail_before_starttls_then_delivers_inside_tls(tmp_path: Path) -> None:
    record = Lab(tmp_path, TLSMode.REQUIRED).run("mail-before-starttls")
    assert record.observed["replies"]["MAIL-before-STARTTLS"] == 530
    assert record.observed["delivered_tls"] is True


def test_listener_with_a_lab_certificate_satisfies_require_verify(tmp_path: Path) -> None:
    lab = Lab(tmp_path, TLSMode.REQUIRED, certificate=Certificate("esa", "lab", ("esa.lab.example",)))
    trust = [LabCA(tmp_path / "state").ca_pem]
    record = lab.run("require-verify", server_name="esa.lab.example", trust_pems=trust)
    assert record.observed["server_cert_verified"] is True and record.observed["delivered_tls"] is True
    demo = Lab(tmp_path / "demo", TLSMode.REQUIRED).run("fail-reject-demo-cert", trust_pems=trust)
    assert demo.observed["server_cert_verified"] is False and demo.observed["aborted"] is True


def test_listener_verifying_client_certificates(tmp_path: Path) -> None:
    none = Lab(tmp_path / "none", TLSMode.REQUIRED, verify_client=True).run("fail-no-client-cert")
    assert none.observed["tls"] is True and none.observed["replies"]["MAIL/tls"] == 554
    untrusted = Lab(tmp_path / "untrusted", TLSMode.REQUIRED, verify_client=True)
    record = untrusted.run("fail-untrusted-client-cert")
    assert record.observed["replies"]["MAIL/tls"] == 554
    assert untrusted.logged("TLS client certificate unverified")


# -- the same behaviours over the loopback carrier and through a stripping middlebox


def test_stripping_middlebox_turns_prefer_into_plaintext_but_require_gives_up(tmp_path: Path) -> None:
    outcomes = {}
    for name in ("prefer", "require"):
        lab = Lab(tmp_path / name, TLSMode.PREFERRED)
        lab.net.listen(SERVER, 25, lab.factory)
        client = ScriptedClient(
            behaviour_steps(name, ehlo="mx.example.net", mail_from="a@example.net", rcpt_to="b@example.com"),
            clock=lab.net.clock,
            connect=lambda f, net=lab.net: net.connect(CLIENT, SERVER, 25, f, middleboxes=[StartTLSStripper()]),
            tls_factory=lab_client_tls(state_dir=tmp_path / "client"),
        )
        outcomes[name] = lab.net.run_until(client.run(), timeout=3600).observed
    assert outcomes["prefer"]["starttls_advertised"] is False and outcomes["prefer"]["delivered_plaintext"] is True
    assert outcomes["require"]["aborted"] is True and outcomes["require"]["delivered"] is False


@pytest_twisted.ensureDeferred
async def test_prefer_over_the_loopback_carrier(tmp_path: Path) -> None:
    base = f"127.62.{os.getpid() % 200 + 20}"
    net = LoopbackNetwork({SERVER: f"{base}.1", CLIENT: f"{base}.2"})
    factory = RemoteMTAFactory("mx.remote.test", starttls="454")
    net.listen(SERVER, 25, factory)
    try:
        client = ScriptedClient(
            behaviour_steps("prefer", ehlo="mx.example.net", mail_from="a@example.net", rcpt_to="b@example.com"),
            clock=reactor,
            connect=lambda f: net.connect(CLIENT, SERVER, 25, f),
            tls_factory=lab_client_tls(state_dir=tmp_path),
            reply_timeout=5,
            target=f"{SERVER}:25",
        )
        record = await net.wait(client.run(), timeout=20)
    finally:
        await net.close()
    assert record.transcript[1] == f"=== Connected to {SERVER}."  # the virtual address, not the 127.x one
    assert record.observed["fell_back"] is True and record.observed["delivered_plaintext"] is True
    assert factory.messages and factory.messages[0].tls is False
