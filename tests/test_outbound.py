"""The appliance delivers: destination controls against misbehaving receivers, over the memory carrier.

Every test looks at what can be observed: the bytes that crossed in the clear, what the receiving MTA got, the
mail-log lines, the DSN in the sender's mailbox, the alert in the administrator's, the queue on disk.
"""

from __future__ import annotations

import email
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from outboundlab import OutboundLab
from twisted.internet.defer import Deferred

from lab.net.carrier import CarrierTimeout
from lab.outbound.attempt import Outcome
from lab.outbound.send import deliver_one
from lab.policy.destinations import DestinationTLS
from lab.smtp.client import ScriptedClient
from lab.smtp.remote_mta import RemoteMTAFactory
from lab.smtp.steps import steps_from_data
from lab.tls.tlsctx import lab_client_tls
from lab.yamlsource import parse_yaml

FAULTS = ("ok", "absent", "454", "garbage-after-220", "handshake-fail", "response-injection")

#: (setting, fault of the only MX) -> (delivered?, over TLS?, alert?) on the first (and, here, only) attempt.
D_TLS, D_CLEAR, DEFER, DEFER_ALERT = (
    (True, True, False),
    (True, False, False),
    (False, None, False),
    (False, None, True),
)
EXPECTED = {
    "no": dict.fromkeys(FAULTS, D_CLEAR),
    "preferred": {
        "ok": D_TLS,
        "absent": D_CLEAR,
        "454": D_CLEAR,
        "garbage-after-220": DEFER,
        "handshake-fail": DEFER,
        "response-injection": D_TLS,
    },
    "required": {
        "ok": D_TLS,
        "absent": DEFER_ALERT,
        "454": DEFER_ALERT,
        "garbage-after-220": DEFER_ALERT,
        "handshake-fail": DEFER_ALERT,
        "response-injection": D_TLS,
    },
    "preferred-verify": {
        "ok": D_TLS,
        "absent": D_CLEAR,
        "454": D_CLEAR,
        "garbage-after-220": DEFER,
        "handshake-fail": DEFER,
        "response-injection": D_TLS,
    },
    "required-verify": {
        "ok": D_TLS,
        "absent": DEFER_ALERT,
        "454": DEFER_ALERT,
        "garbage-after-220": DEFER_ALERT,
        "handshake-fail": DEFER_ALERT,
        "response-injection": D_TLS,
    },
}


@pytest.mark.parametrize(("tls", "fault"), [(t, f) for t in EXPECTED for f in FAULTS])
def test_each_setting_against_each_fault(tls: str, fault: str, tmp_path: Path) -> None:
    delivered, over_tls, alert = EXPECTED[tls][fault]
    lab = OutboundLab(tmp_path, tls=tls, mx1=fault, retries=0)  # one attempt, then the bounce
    lab.send()
    lab.run()
    clear = lab.clear_bytes()
    first = lab.engine.attempts[0]
    received = lab.mtas["mx1"].messages
    assert first.tls_setting == str(DestinationTLS(_setting(tls)))
    if delivered:
        assert len(received) == 1 and received[0].tls is over_tls
        assert b".a line with a dot\r\n" in received[0].data  # dot-stuffing undone by the receiver
        assert first.outcome is Outcome.DELIVERED
        assert (b"MAIL FROM:<alice@example.com>" in clear) is (not over_tls)
        assert lab.inbox() == []
    else:
        assert received == [] and b"MAIL FROM" not in clear and b"a line with a dot" not in clear
        assert first.outcome is Outcome.NOT_SENT
        [dsn] = lab.inbox()  # retries=0: bounced at once, the DSN goes to alice@example.com (local)
        assert dsn["To"] == "<alice@example.com>"
    assert (b"STARTTLS" in clear) is (tls != "no" and fault != "absent")
    assert len(lab.alerts()) == int(alert)
    assert [e["event"] for e in lab.events("alert")] == ["alert"] * int(alert)


def _setting(text: str) -> str:
    return {"no": "No", "preferred": "Preferred", "required": "Required"}.get(
        text, text.replace("-verify", " (Verify)").capitalize().replace("(verify)", "(Verify)")
    )


def test_required_tls_failure_writes_the_documented_lines_and_alert(tmp_path: Path) -> None:
    lab = OutboundLab(tmp_path, tls="required", mx1="454", retries=3)
    lab.send()
    lab.run()
    texts = lab.texts()
    assert texts[:6] == [
        "New SMTP DCID 1 interface 192.168.2.1 address 198.51.100.11 port 25",
        "DCID 1 domain dest.test mx mx1.dest.test TLS Required",
        "DCID 1 TLS failed: STARTTLS answered 454 4.7.0 TLS not available due to local problem",
        "DCID 1 IP 198.51.100.11 TLS was required but could not be successfully negotiated",
        "DCID 1 close",
        "New SMTP DCID 2 interface 192.168.2.1 address 198.51.100.12 port 25",  # the next MX (nobody there)
    ]
    assert "Delayed: DCID 2 MID 1 to RID 0 - TLS was required but could not be negotiated with mx1.dest.test" in texts
    [first, *_] = lab.events("alert")
    assert first["level"] == "Warning" and first["severity"] == "Warning" and first["alert_class"] == "System"
    assert "dest.test" in first["text"]
    message = lab.alerts()[0]
    assert message["To"] == "<admin@example.com>"
    assert message["Subject"] == "Warning <System> esa.lab.example: TLS required for dest.test failed"
    assert "TLS was required for domain dest.test" in message.get_payload()


def test_retries_follow_the_bounce_profile_on_the_virtual_clock(tmp_path: Path) -> None:
    lab = OutboundLab(tmp_path, tls="required", mx1="absent", retries=3)
    lab.send()
    lab.run()
    times = [round(a.at) for a in lab.engine.attempts if a.mx_host == "mx1.dest.test"]
    assert times == [0, 60, 180, 420]  # 60, then doubling up to max_wait 240
    assert len(lab.alerts()) == 4  # one per failed round
    counters = lab.engine.counters["dest.test"]
    assert (counters.delivered, counters.deferred, counters.bounced) == (0, 3, 1)
    assert counters.tls_failure == 4 and counters.tls_success == 0
    bounced = lab.events("bounced")
    assert bounced[0]["reason"].startswith("delivery time expired after 4 attempts: TLS was required")


def test_the_dsn_is_rfc_3464(tmp_path: Path) -> None:
    lab = OutboundLab(tmp_path, tls="required-verify", mx1="absent", retries=0)
    lab.send()
    lab.run()
    [dsn] = lab.inbox()
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    assert dsn["From"].startswith("Mail Delivery System <MAILER-DAEMON@esa.lab.example>")
    human, status, headers = dsn.get_payload()
    assert human.get_content_type() == "text/plain" and "<bob@dest.test>" in human.get_payload()
    assert status.get_content_type() == "message/delivery-status"
    per_message, per_recipient = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; esa.lab.example"
    assert per_recipient["Final-Recipient"] == "rfc822; bob@dest.test"
    assert per_recipient["Action"] == "failed"
    assert per_recipient["Status"] == "5.4.7"
    assert per_recipient["Diagnostic-Code"].startswith("smtp; delivery time expired after 1 attempts")
    assert headers.get_content_type() == "text/rfc822-headers"
    assert "Subject: hello" in headers.get_payload()


def test_a_dsn_goes_out_with_the_null_sender_and_never_gets_a_dsn(tmp_path: Path) -> None:
    lab = OutboundLab(tmp_path, tls="required", mx1="absent", retries=0)
    lab.send(sender="", to=("bob@dest.test",))  # as if it were a DSN itself
    lab.run()
    assert lab.inbox() == [] and len(lab.engine.queue) == 0
    lab2 = OutboundLab(tmp_path / "remote", tls="no", mx1="ok", retries=0)
    lab2.send(sender="someone@dest.test", to=("nobody@nowhere.test",))  # no MX: bounced, DSN to dest.test
    lab2.run()
    [dsn] = lab2.mtas["mx1"].messages
    assert dsn.mail_from == "" and dsn.rcpt_to == ["someone@dest.test"]
    assert b"Content-Type: message/delivery-status" in dsn.data
    assert b"Status: 5.1.2" in dsn.data


def test_mx_preference_order_and_fallback_to_the_next_mx(tmp_path: Path) -> None:
    lab = OutboundLab(tmp_path, tls="preferred", mx1=None, mx2="ok")  # mx1 (preference 10) is not listening
    lab.send()
    lab.run()
    assert [a.mx_host for a in lab.engine.attempts] == ["mx1.dest.test", "mx2.dest.test"]
    assert (lab.engine.attempts[0].failure_reason or "").startswith("connection failed")
    [error] = lab.events("dcid_error")
    assert error["dcid"] == 1 and error["reason"].startswith("connection failed")
    assert len(lab.mtas["mx2"].messages) == 1


def test_a_required_tls_failure_tries_the_next_mx_with_tls(tmp_path: Path) -> None:
    lab = OutboundLab(tmp_path, tls="required", mx1="absent", mx2="ok")
    lab.send()
    lab.run()
    assert lab.mtas["mx2"].messages[0].tls is True
    assert len(lab.alerts()) == 1  # mx1 failed the requirement: the operator hears of it


def test_preferred_verify_delivers_over_tls_with_an_unverified_certificate_and_logs_it(tmp_path: Path) -> None:
    lab = OutboundLab(tmp_path, tls="preferred-verify", mx1="ok", mx1_names=("other.test",))
    lab.send()
    lab.run()
    assert lab.mtas["mx1"].messages[0].tls is True
    [cert] = lab.events("dcid_certificate")
    assert cert["state"] == "unverified" and cert["level"] == "Warning"
    assert cert["reason"].startswith("certificate-host-mismatch")
    assert lab.engine.attempts[0].certificate_verified is False
    assert lab.engine.attempts[0].result_type == "certificate-host-mismatch"


def test_required_verify_refuses_an_unverified_certificate(tmp_path: Path) -> None:
    lab = OutboundLab(tmp_path, tls="required-verify", mx1="ok", mx1_names=("other.test",), retries=0)
    lab.send()
    lab.run()
    assert lab.mtas["mx1"].messages == []
    assert b"MAIL FROM" not in lab.clear_bytes()
    attempt = lab.engine.attempts[0]
    assert attempt.tls is True and attempt.certificate_verified is False and attempt.outcome is Outcome.NOT_SENT
    assert len(lab.alerts()) == 1
    [bounced] = lab.events("bounced")
    assert bounced["reason"].endswith(
        "TLS was required with a verified certificate; mx1.dest.test's: certificate-host-mismatch"
    )


def test_a_certificate_naming_the_domain_verifies(tmp_path: Path) -> None:
    lab = OutboundLab(tmp_path, tls="required-verify", mx1="ok", mx1_names=("*.test", "dest.test"))
    lab.send()
    lab.run()
    assert lab.engine.attempts[0].certificate_verified is True
    assert len(lab.mtas["mx1"].messages) == 1


def cn_only_certificate(ca: Any, common_name: str) -> Any:
    """A leaf of the lab CA that names its host in the CN only (no subjectAltName), as older CAs issued them."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from lab.tls.certs import CertKey

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca._cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(ca._key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return CertKey("cn-only", cert.public_bytes(serialization.Encoding.PEM), key_pem)


@pytest.mark.parametrize(
    ("common_name", "verified"),
    [
        ("mx1.dest.test", True),
        ("*.dest.test", True),
        ("*.test", True),
        ("*.mx1.dest.test", False),
        ("other.test", False),
    ],
)
def test_a_certificate_without_subject_alt_names_is_matched_by_its_cn(
    tmp_path: Path, common_name: str, verified: bool
) -> None:
    from lab.tls.certs import LabCA
    from lab.tls.tlsctx import ServerTLS

    lab = OutboundLab(tmp_path, tls="required-verify", mx1=None, retries=0)
    server = ServerTLS(cn_only_certificate(LabCA(tmp_path / "state"), common_name))
    mta = RemoteMTAFactory("mx1.dest.test", tls_server=server, clock=lab.net.clock)
    lab.net.listen("198.51.100.11", 25, mta)
    lab.send()
    lab.run()
    assert lab.engine.attempts[0].certificate_verified is verified  # *.test names the domain, dest.test
    assert len(mta.messages) == int(verified)


def test_messages_per_connection_limit(tmp_path: Path) -> None:
    lab = OutboundLab(tmp_path, tls="no", mx1="ok", per_connection=2)
    for _ in range(5):
        lab.send()
    lab.run()
    assert len(lab.mtas["mx1"].messages) == 5
    assert sorted(len(a.mids) for a in lab.engine.attempts) == [1, 2, 2]  # three connections at once
    assert len(lab.mtas["mx1"].sessions) == 3


def test_a_receiver_that_never_answers_is_given_up_on_the_virtual_clock(tmp_path: Path) -> None:
    from twisted.internet.protocol import Protocol, ServerFactory

    lab = OutboundLab(tmp_path, tls="preferred", mx1=None, retries=0)
    lab.net.listen("198.51.100.11", 25, ServerFactory.forProtocol(Protocol))  # accepts, never greets
    lab.send()
    lab.run()
    [silent, refused] = lab.engine.attempts
    assert "timeout" in (silent.failure_reason or "") and silent.outcome is Outcome.NOT_SENT
    assert 30 <= refused.at < 60  # the reply timeout (30 s) passed on the virtual clock, then the next MX
    assert len(lab.inbox()) == 1  # bounced after its only attempt: the DSN


def test_the_outbound_certificate_is_presented_to_a_receiver_that_asks(tmp_path: Path) -> None:
    from lab.tls.certs import LabCA
    from lab.tls.tlsctx import ServerTLS

    lab = OutboundLab(tmp_path, tls="required", mx1=None)
    ca = LabCA(tmp_path / "state")
    server = ServerTLS(ca.issue("mx1", ["mx1.dest.test"]), request_client_cert=True, client_ca_pems=[ca.ca_pem])
    mta = RemoteMTAFactory("mx1.dest.test", tls_server=server, clock=lab.net.clock)
    lab.net.listen("198.51.100.11", 25, mta)
    lab.send()
    lab.run()
    assert mta.messages[0].tls is True
    assert mta.sessions[0].client_cert_subject == "CN=esa.lab.example"  # outbound.certificate: esa-lab


def test_a_published_policy_can_tighten_a_domains_control(tmp_path: Path) -> None:
    """The seam MTA-STS plugs into: the control applied, and the policy recorded on each DeliveryAttempt."""
    from dataclasses import replace

    from lab.outbound.engine import DeliveryEngine
    from lab.outbound.published import AppliedPolicy

    lab = OutboundLab(tmp_path, tls="preferred", mx1="absent", retries=0)
    engine: DeliveryEngine = lab.engine

    def sts(domain: str, control: Any) -> Any:
        tightened = replace(control, tls=DestinationTLS.REQUIRED_VERIFY)
        return AppliedPolicy(tightened, "sts", ("version: STSv1", "mode: enforce"))

    engine.policy_source = sts
    lab.send()
    lab.run()
    attempt = engine.attempts[0]  # mx1; then mx2, where nobody listens
    assert attempt.tls_setting == "Required (Verify)" and {a.policy_type for a in engine.attempts} == {"sts"}
    assert attempt.policy_strings == ("version: STSv1", "mode: enforce")
    assert lab.mtas["mx1"].messages == [] and len(lab.alerts()) == 1


def test_concurrent_connections_limit(tmp_path: Path) -> None:
    lab = OutboundLab(tmp_path, tls="no", mx1="ok", per_connection=1, concurrency=2)
    for _ in range(5):
        lab.send()
    lab.run()
    assert len(lab.mtas["mx1"].messages) == 5
    flows = [f for f in lab.net.capture.flows if f.server.ip == "198.51.100.11"]
    assert len(flows) == 5
    for flow in flows:  # at any moment at most two connections are open
        open_then = [g for g in flows if g.opened <= flow.opened < (g.closed or float("inf"))]
        assert len(open_then) <= 2


def test_recipients_per_hour_limit(tmp_path: Path) -> None:
    lab = OutboundLab(tmp_path, tls="no", mx1="ok", per_hour=2)
    for _ in range(3):
        lab.send()
    lab.run()
    times = sorted(round(a.at) for a in lab.engine.attempts)
    assert len(lab.mtas["mx1"].messages) == 3
    assert times[0] == 0 and times[-1] >= 3600  # the third waited for the hour's allowance
    assert lab.engine.counters["dest.test"].deferred == 0  # waiting for the allowance is not a failed attempt


def test_a_5xx_recipient_bounces_at_once_with_the_receivers_status(tmp_path: Path) -> None:
    lab = OutboundLab(tmp_path, tls="no", mx1=None, retries=5)
    inbound = lab.runtime.appliance.listener("Inboundmail")  # an appliance listener: its RAT refuses dest.test
    lab.net.listen("198.51.100.11", 25, lab.runtime.factory(inbound))
    lab.send()
    lab.run()
    [attempt] = lab.engine.attempts  # no retry: the refusal is permanent
    assert attempt.outcome is Outcome.BOUNCED
    [bounced] = lab.events("bounced")
    assert bounced["reason"].startswith("550")
    [dsn] = [m for m in lab.inbox() if m.get_content_type() == "multipart/report"]
    per_recipient = dsn.get_payload()[1].get_payload()[1]
    assert per_recipient["Status"].startswith("5.") and per_recipient["Diagnostic-Code"].startswith("smtp; 550")


def test_the_queue_survives_a_restart(tmp_path: Path) -> None:
    first = OutboundLab(tmp_path, tls="preferred", mx1=None, mx2=None)  # nobody listens: deferred
    first.send()
    with pytest.raises(CarrierTimeout):
        first.net.run_until(Deferred(), timeout=30)
    first.engine.stop()
    assert len(first.engine.queue) == 1
    files = sorted(p.name for p in (tmp_path / "state" / "queue").rglob("*") if p.is_file())
    assert len(files) == 2  # the message and its state
    second = OutboundLab(tmp_path, tls="preferred", mx1="ok")  # a new process: the queue is read from disk
    assert len(second.engine.queue) == 1
    second.run()
    assert len(second.mtas["mx1"].messages) == 1
    assert round(second.engine.attempts[0].at) == 60  # the retry time saved before the restart
    assert len(second.engine.queue) == 0
    assert not [p for p in (tmp_path / "state" / "queue").rglob("*") if p.is_file()]


def test_relay_listener_queues_remote_recipients_and_spools_local_ones(tmp_path: Path) -> None:
    lab = OutboundLab(tmp_path, tls="required", mx1="ok")
    listener = lab.runtime.appliance.listener("Outboundmail")
    lab.net.listen("192.168.1.1", 25, lab.runtime.factory(listener))
    script = (
        "[{ehlo: mail.example.com},"
        " {mail: {from: carol@example.com, to: [bob@dest.test, dave@example.com]}, expect: '250'}, quit]"
    )
    client = ScriptedClient(
        steps_from_data(parse_yaml(script, "t.yaml")),
        clock=lab.net.clock,
        connect=lambda f: lab.net.connect("192.168.1.25", "192.168.1.1", 25, f),
        tls_factory=lab_client_tls(state_dir=tmp_path),
    )
    record = lab.net.run_until(client.run(), timeout=60)
    lab.run()
    assert record.observed["replies"]["DOT"] == 250
    [relayed] = lab.mtas["mx1"].messages
    assert relayed.rcpt_to == ["bob@dest.test"] and relayed.tls is True
    assert relayed.data.startswith(b"Received: from ")  # the appliance's own trace header
    assert [m["To"] for m in lab.inbox("Outboundmail")] == ["<bob@dest.test>"]  # the local copy for dave
    assert any(t.startswith("MID 1 spooled queue ") for t in lab.texts())


def test_deliver_one_is_the_appliance_as_a_sender(tmp_path: Path) -> None:
    from lab.net.memory import MemoryNetwork

    net = MemoryNetwork()
    mta = RemoteMTAFactory("mx.receiver.test", starttls="absent", clock=net.clock)
    net.listen("198.51.100.77", 2525, mta)
    result = net.run_until(
        deliver_one(
            carrier=net,
            receiver_ip="198.51.100.77",
            receiver_port=2525,
            setting=DestinationTLS.REQUIRED,
            state_dir=tmp_path,
        ),
        timeout=600,
    )
    assert result.state == "deferred" and mta.messages == []
    [attempt] = result.attempts
    assert attempt.result_type == "starttls-not-supported" and attempt.mx_host == "mx.receiver.test"
    assert any("TLS was required but could not be successfully negotiated" in line for line in result.log)
    result = net.run_until(
        deliver_one(
            carrier=net,
            receiver_ip="198.51.100.77",
            receiver_port=2525,
            setting=DestinationTLS.PREFERRED,
            state_dir=tmp_path,
        ),
        timeout=600,
    )
    assert result.state == "delivered" and len(mta.messages) == 1 and mta.messages[0].tls is False


def test_dsn_parses_as_mime(tmp_path: Path) -> None:
    lab = OutboundLab(tmp_path, tls="required", mx1="handshake-fail", retries=0)
    lab.send()
    lab.run()
    raw = sorted((tmp_path / "spool" / "Inboundmail" / "new").iterdir())[0].read_bytes()
    parsed = email.message_from_bytes(raw)
    assert parsed.is_multipart() and not parsed.defects


def test_the_worked_example_of_the_docs_prints_what_they_show(tmp_path: Path) -> None:
    import subprocess
    import sys

    doc = (Path(__file__).resolve().parent.parent / "docs" / "outbound.md").read_text()
    example = doc.split("## A worked example", 1)[1]
    script, rest = example.split("```python\n", 1)[1].split("```\n", 1)
    shown = rest.split("```\n", 1)[1].split("```", 1)[0]
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == shown
    mailbox = tmp_path / "outbound-demo" / "state" / "alerts" / "postmaster@example.com" / "new"
    assert len(list(mailbox.iterdir())) == 2


def test_a_crash_between_the_queue_writes_leaves_nothing_half_made(tmp_path: Path) -> None:
    from lab.outbound.queue import OutboundQueue

    queue = OutboundQueue(tmp_path / "queue")
    [kept] = queue.enqueue(b"kept\r\n", mid=1, sender="a@example.com", recipients=[(0, "b@dest.test")], now=0)
    [orphan] = queue.enqueue(b"orphan\r\n", mid=2, sender="a@example.com", recipients=[(0, "c@dest.test")], now=0)
    (queue.state_dir / f"{orphan.name}.json").unlink()  # the crash came before the state reached the disk
    (queue.state_dir / "half.tmp").write_text("{")
    (queue.state_dir / "ghost.json").write_text("{}")  # a state without its message
    again = OutboundQueue(tmp_path / "queue")
    assert list(again.items) == [kept.name] and again.message(kept) == b"kept\r\n"
    dropped = sorted(Path(path).name for path, _ in again.recovered)
    assert dropped == sorted([orphan.name, "half.tmp", "ghost.json"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(st.lists(st.sampled_from(["a.test", "b.test", "c.test"]), min_size=1, max_size=3), st.booleans()),
        min_size=1,
        max_size=6,
    )
)
def test_a_reloaded_queue_holds_exactly_what_was_saved(tmp_path_factory: pytest.TempPathFactory, plan: Any) -> None:
    from dataclasses import replace

    from lab.outbound.queue import OutboundQueue, QueueState

    root = tmp_path_factory.mktemp("queue")
    queue = OutboundQueue(root)
    for mid, (domains, finish) in enumerate(plan, 1):
        rcpts = [(rid, f"u{rid}@{domain}") for rid, domain in enumerate(domains)]
        for item in queue.enqueue(f"m{mid}\r\n".encode(), mid=mid, sender="s@example.com", recipients=rcpts, now=mid):
            done = {r.rid: replace(r, state=QueueState.DELIVERED) for r in item.recipients} if finish else {}
            queue.update(replace(item.with_recipients(done), attempts=1, next_attempt=mid + 60.5))
    again = OutboundQueue(root)
    assert again.items == queue.items and again.recovered == []
    assert all(again.message(item) == f"m{item.mid}\r\n".encode() for item in again)
