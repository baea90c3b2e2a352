"""``smtplab probe``: policy inference against the lab's own listener, and deviations against broken ones.

The lab's listener is served as a real process (``smtplab serve``) for each policy, and the probe's CLI reads
it over loopback TCP. Each deviation is proven against a deliberately broken listener made here: the real
listener whose session runs with exactly one fault policy (``tests/broken_sessions.py``), served in-process on
the memory carrier: real TLS, virtual time (every reply timeout and settle window passes on a ``task.Clock``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from broken_sessions import PROBE_FAULTS
from labruntime import lab_runtime
from peers import Peer, aiosmtpd_peer, make_peer_workdir, next_address, postfix, require_peer, start_all, stop_all
from peers.aiosmtpd_peer import AiosmtpdPeer
from peers.postfix import PostfixPeer
from serving import Served, free_port, fresh_loopback, serve
from twisted.internet import protocol, reactor

from lab.appliance.config import quick_appliance
from lab.commands import probe as probe_command
from lab.conformance.probe import (
    CHECKS,
    ProbeReport,
    ProbeSettings,
    ProbeUnreachable,
    exchange,
    probe,
    run_probe,
    sent,
    span,
    tcp_carrier,
)
from lab.conformance.profile import load_profile
from lab.errors import BadInput
from lab.net.memory import MemoryNetwork
from lab.policy.modes import Behaviour, TLSMode
from lab.smtp.faults import NO_FAULTS
from lab.smtp.transcript import Direction, Entry, Kind, from_legacy_line
from lab.tls.certs import LabCA

REPO = Path(__file__).resolve().parent.parent


def smtplab(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lab", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


# -- evidence helpers (pure)

TEXT = [
    "=== Connected to 127.0.0.1.",
    "<-  220 mx ESMTP",
    " -> EHLO c.example",
    "<-  250-mx",
    "<-  250 STARTTLS",
    " -> STARTTLS",
    "<-  220 go ahead",
    "=== TLS started with cipher TLSv1.3:TLS_AES_256_GCM_SHA384:256",
    " ~> EHLO c.example",
    "<~  250 mx",
    " ~> MAIL FROM:<a@b.invalid>",
    "<~  250 ok",
]
LINES = [from_legacy_line(line) for line in TEXT]
LINES[7] = Entry(Direction.NOTE, LINES[7].text, kind=Kind.TLS_STARTED)


def test_exchange_takes_a_sent_line_and_its_reply() -> None:
    assert exchange(LINES, sent("EHLO")) == LINES[2:5]
    assert exchange(LINES, sent("ehlo", tls=True)) == LINES[8:10]
    assert exchange(LINES, sent("MAIL", tls=False)) == []
    assert exchange(LINES, sent("MAIL")) == LINES[10:12]


def test_span_runs_through_the_end_line() -> None:
    assert span(LINES, sent("STARTTLS"), lambda entry: entry.kind is Kind.TLS_STARTED) == LINES[5:8]
    assert span(LINES, sent("QUIT"), lambda line: True) == []


# -- the lab's own listener, served as a process, probed through the CLI


def probe_json(address: str, *extra: str) -> tuple[int, dict[str, Any]]:
    done = smtplab("probe", address, "--json", "--timeout", "5", *extra)
    assert done.stderr == ""
    return done.returncode, json.loads(done.stdout)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Served]]:
    """One served listener (a real `smtplab serve` process) per TLS setting, shared by the tests below."""
    with (
        serve(tmp_path_factory.mktemp("no"), "--tls", "no") as no,
        serve(tmp_path_factory.mktemp("preferred"), "--tls", "preferred") as preferred,
        serve(tmp_path_factory.mktemp("required"), "--tls", "required") as required,
    ):
        yield {"no": no, "preferred": preferred, "required": required}


@pytest.mark.parametrize(
    ("tls", "advertised"), [(TLSMode.NO, False), (TLSMode.PREFERRED, True), (TLSMode.REQUIRED, True)]
)
@pytest_twisted.ensureDeferred
async def test_probe_classifies_the_served_listener(served: dict[str, Served], tls: TLSMode, advertised: bool) -> None:
    target = served[str(tls)]
    settings = ProbeSettings(host=target.host, port=target.port, timeout=5.0, settle=0.2)
    report = await probe(settings, tcp_carrier(settings, reactor))
    assert (report.policy, report.verify_client, report.conclusive) == (tls, False, True)
    assert report.starttls_advertised is advertised
    assert report.findings == () and report.exit_code == 0
    assert (report.tls is not None) is advertised
    assert target.maildir_new() == []  # MAIL/RCPT answers were enough: nothing was delivered
    assert not any("DATA" in line for line in report.transcript)
    assert " -> MAIL FROM:<probe@smtplab.invalid>" in report.transcript
    assert set(report.evidence) <= set(report.transcript)
    proof = {
        TLSMode.NO: "<-  502 5.5.1 STARTTLS not implemented",
        TLSMode.PREFERRED: "<-  250 2.1.5 Recipient OK",
        TLSMode.REQUIRED: "<-  530 5.7.0 Must issue a STARTTLS command first",
    }
    assert proof[tls] in report.evidence
    if tls is TLSMode.REQUIRED:
        assert "<~  250 2.1.0 Sender OK" in report.evidence


def test_cli_json(served: dict[str, Served]) -> None:
    code, report = probe_json(f"{served['preferred'].host}:{served['preferred'].port}")
    assert code == 0
    assert (report["policy"], report["verify_client"], report["starttls_advertised"]) == ("preferred", False, True)
    assert report["deviations"] == [] and report["conclusive"] is True
    assert report["tls"]["version"].startswith("TLSv1.")
    assert report["checks"]["plain"]["plain.MAIL"] == 250
    assert report["transcript"][0] == "=== probe plain: EHLO, MAIL and RCPT in plaintext"


@pytest_twisted.ensureDeferred
async def test_probe_sees_required_with_client_certificate_verification(tmp_path: Path) -> None:
    with serve(tmp_path, "--tls", "required", "--verify-client") as served:
        settings = ProbeSettings(host=served.host, port=served.port, timeout=5.0, settle=0.2)
        without = await probe(settings, tcp_carrier(settings, reactor))
        cert = LabCA(served.workdir / "state").issue("probe-client", ["client.example.net"], client=True)
        with_cert = await probe(dataclasses.replace(settings, client_cert=cert), tcp_carrier(settings, reactor))
    for report in (without, with_cert):
        assert (report.policy, report.verify_client, report.findings) == (TLSMode.REQUIRED, True, ())
        assert report.conclusive and report.client_cert_requested
        assert report.client_ca_names == ("O=smtplab,CN=smtplab Lab CA",)
    assert without.checks["tls"]["tls.MAIL"] == 554
    assert with_cert.checks["tls-cert"]["tls.MAIL"] == 250
    assert with_cert.checks["tls-untrusted"]["tls.MAIL"] == 554
    assert "accepted inside TLS with the client certificate" in with_cert.basis


def test_human_summary(served: dict[str, Served]) -> None:
    done = smtplab("probe", f"{served['required'].host}:{served['required'].port}", "--timeout", "5")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[1] == "Policy: Required"
    assert lines[2] == "  because plaintext MAIL/RCPT are refused (530/530) and accepted inside TLS"
    assert "Deviations (an RFC MUST or SHOULD broken): none found" in lines
    assert "Differences from the lab's own listener (not failures): none" in lines


def test_unreachable_target_is_one_line_and_exit_2() -> None:
    host = fresh_loopback()
    done = smtplab("probe", f"{host}:{free_port(host)}", "--timeout", "3")
    assert done.returncode == 2
    assert done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"smtplab probe: cannot probe {host}:") and "refused" in line.lower()


def test_bad_input_is_one_line_and_exit_3() -> None:
    done = smtplab("probe", "192.0.2.7:25")
    assert done.returncode == 3
    assert done.stderr.strip().splitlines() == [
        "smtplab: HOST:PORT: 192.0.2.7 is not a loopback address; smtplab talks to 127.0.0.0/8 or ::1 unless told "
        "otherwise"
    ]


def parse(*argv: str) -> ProbeSettings:
    parser = argparse.ArgumentParser()
    probe_command.add_arguments(parser)
    return probe_command.settings_from(parser.parse_args(list(argv)))


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["127.0.0.1"], "is not HOST:PORT"),
        (["mx.example.com:25"], "not a loopback IP address"),
        (["127.0.0.1:25", "--to", "nobody"], "not a mail address"),
        (["127.0.0.1:25", "--from", "a@b> x"], "not a mail address"),
        (["127.0.0.1:25", "--timeout", "0"], "more than 0"),
        (["127.0.0.1:25", "--ca", "/nonexistent/ca.pem"], "cannot read"),
        (["127.0.0.1:25", "--cert", "c.pem"], "--cert and --key go together"),
    ],
)
def test_bad_flags(argv: list[str], needle: str) -> None:
    with pytest.raises(BadInput, match=re.escape(needle)):
        parse(*argv)


def test_flags_become_settings(tmp_path: Path) -> None:
    ca = LabCA(tmp_path)
    (tmp_path / "ca.pem").write_bytes(ca.ca_pem)
    settings = parse("[::1]:2525", "--ehlo", "me.example", "--to", "x@example.org", "--ca", str(tmp_path / "ca.pem"))
    assert (settings.host, settings.port, settings.ehlo) == ("::1", 2525, "me.example")
    assert settings.recipient == "x@example.org" and settings.ca_pems == (ca.ca_pem,)
    assert parse("127.0.0.1:25", "--server-name", "mx.example.net").recipient == "postmaster@example.net"
    assert parse("127.0.0.1:25").recipient == "postmaster@example.com"


# -- broken listeners of our own making: one fault each


#: Where the broken listener and the probe sit on the memory network (any addresses do: nothing leaves the process).
LAB = ("192.0.2.25", 25)
PROBER = "198.51.100.7"


def broken_lab(
    tmp_path: Path,
    tls: TLSMode,
    fault: str | None,
    *,
    verify_client: bool = False,
    behaviour: Behaviour | None = None,
    rat: tuple[str, ...] | None = None,
) -> MemoryNetwork:
    """The real listener on the memory carrier (virtual time, real TLS), its session broken by ``fault``."""
    net = MemoryNetwork()
    host, port = LAB
    appliance = quick_appliance(host, port, tls, verify_client=verify_client)
    listener = appliance.listeners[0]
    if behaviour is not None:
        accepted = dataclasses.replace(listener.policies["ACCEPTED"], behaviour=behaviour)
        listener = dataclasses.replace(listener, policies={**listener.policies, "ACCEPTED": accepted})
    if rat is not None:
        listener = dataclasses.replace(listener, rat=rat)
    appliance = dataclasses.replace(appliance, listeners=(listener,))
    runtime = lab_runtime(appliance, net.clock, tmp_path, faults=NO_FAULTS if fault is None else PROBE_FAULTS[fault])
    net.listen(host, port, runtime.factory(listener))
    return net


def in_memory(**kwargs: Any) -> ProbeSettings:
    """Settings for a probe of ``LAB`` from ``PROBER``, with the command's default timeouts (they are virtual)."""
    return ProbeSettings(host=LAB[0], port=LAB[1], source=PROBER, **kwargs)


def probe_broken(tmp_path: Path, tls: TLSMode, fault: str | None, **kwargs: Any) -> ProbeReport:
    net = broken_lab(tmp_path, tls, fault, **kwargs.pop("listener", {}))
    return run_probe(in_memory(**kwargs), net)


BROKEN = [
    # fault, policy of the listener, a line the evidence must hold
    ("helo-before-starttls", TLSMode.REQUIRED, "<-  250 esa.lab.example"),
    ("starttls-injection", TLSMode.REQUIRED, "<~  250 2.0.0 OK"),
    ("starttls-pipelined-plaintext", TLSMode.PREFERRED, "<-  250 2.0.0 OK"),
    ("state-across-tls", TLSMode.PREFERRED, "<~  250 2.1.0 Sender OK"),
    ("mail-without-ehlo", TLSMode.REQUIRED, "<~  250 2.1.0 Sender OK"),
    ("envelope-across-tls", TLSMode.PREFERRED, "<~  250 2.1.5 Recipient OK"),
    ("starttls-twice", TLSMode.PREFERRED, "<~  220 2.0.0 Ready to start TLS again"),
    ("starttls-in-tls-ehlo", TLSMode.REQUIRED, "<~  250-STARTTLS"),
    ("starttls-argument", TLSMode.PREFERRED, " -> STARTTLS SMTPLAB-PROBE"),
    ("long-command-line", TLSMode.NO, "<-  250 2.0.0 OK"),
    ("nul-in-command", TLSMode.REQUIRED, " -> NOOP \\x00"),
    ("starttls-refused", TLSMode.PREFERRED, "<-  454 4.7.0 TLS not available due to local problem"),
    ("starttls-unadvertised", TLSMode.NO, "<-  220 2.0.0 Ready to start TLS"),
]


def test_every_check_has_a_broken_listener() -> None:
    assert {fault for fault, _, _ in BROKEN} == set(CHECKS)


@pytest.mark.parametrize(("fault", "mode", "needle"), BROKEN, ids=[b[0] for b in BROKEN])
def test_each_deviation_is_found_with_evidence(tmp_path: Path, fault: str, mode: TLSMode, needle: str) -> None:
    report = probe_broken(tmp_path, mode, fault)
    assert [f.id for f in report.findings] == [fault], report.summary()
    (finding,) = report.findings
    assert needle in finding.evidence, finding.evidence
    assert finding.evidence[0].startswith("=== probe ")
    assert set(finding.evidence) <= set(report.transcript)  # the evidence is quoted, never made up
    expected_policy = TLSMode.NO if fault == "starttls-refused" else mode
    assert report.policy is expected_policy
    data = report.to_dict()
    if fault in DIFFERENCES:  # only the lab listener's own choice: listed, never a failure
        assert finding.level == "difference" and report.exit_code == 0
        assert data["deviations"] == [] and data["differences"][0]["id"] == fault
    else:
        assert finding.level in ("MUST", "SHOULD") and report.exit_code == 1
        assert data["differences"] == [] and data["deviations"][0]["id"] == fault
        assert data["deviations"][0]["level"] == finding.level


#: The findings that only differ from the lab listener's own choices (docs/rules.md), with no RFC MUST or
#: SHOULD behind them: RFC 5321 4.5.3.1 asks implementations to avoid limits, and a second STARTTLS, an argument
#: or MAIL without EHLO are the client's faults that a server may tolerate.
DIFFERENCES = {
    "long-command-line", "nul-in-command", "starttls-twice", "starttls-argument", "mail-without-ehlo",
    "starttls-refused", "starttls-unadvertised",
}  # fmt: skip


def test_every_rule_names_its_level_and_cites_rfcs_or_the_rules_page() -> None:
    """Each rule text cites an RFC section or docs/rules.md, never a file users do not get, and says its level."""
    for check, (_title, rule, level) in CHECKS.items():
        assert "SPEC" not in rule and ("RFC " in rule or "docs/rules.md §" in rule), check
        assert (level == "difference") == (check in DIFFERENCES), check
        if level != "difference":
            assert f"({level}" in rule, check  # the level is in the text users read too


@pytest.mark.parametrize("mode", list(TLSMode))
def test_the_correct_listener_shows_no_deviation_in_process(tmp_path: Path, mode: TLSMode) -> None:
    report = probe_broken(tmp_path, mode, None)
    assert (report.policy, report.findings, report.conclusive, report.exit_code) == (mode, (), True, 0)


def test_preferred_with_verification_refuses_an_untrusted_certificate(tmp_path: Path) -> None:
    report = probe_broken(tmp_path, TLSMode.PREFERRED, None, listener={"verify_client": True})
    assert (report.policy, report.verify_client, report.findings) == (TLSMode.PREFERRED, True, ())
    assert report.checks["tls"]["tls.MAIL"] == 250  # no certificate: still welcome
    assert report.checks["tls-untrusted"]["tls.MAIL"] == 554
    assert "a client certificate that does not verify is refused" in report.basis


def test_required_closing_after_an_unverified_handshake(tmp_path: Path) -> None:
    report = probe_broken(tmp_path, TLSMode.REQUIRED, "close-unverified", listener={"verify_client": True})
    assert (report.policy, report.verify_client, report.conclusive) == (TLSMode.REQUIRED, True, True)
    assert "inside TLS too (EHLO 421)" in report.basis
    assert "<~  421 4.7.1 Client certificate required" in report.evidence
    assert report.findings == ()


def test_rejecting_greeting_is_unreachable(tmp_path: Path) -> None:
    net = broken_lab(tmp_path, TLSMode.PREFERRED, None, behaviour=Behaviour.REJECT)
    with pytest.raises(ProbeUnreachable, match=f"cannot probe {LAB[0]}:{LAB[1]}: greeting 554"):
        run_probe(in_memory(), net)


def test_nobody_listening_in_memory_is_unreachable(tmp_path: Path) -> None:
    with pytest.raises(ProbeUnreachable, match=f"cannot probe {LAB[0]}:{LAB[1]}: connection failed"):
        run_probe(in_memory(), MemoryNetwork())


def test_the_probe_waits_on_the_carriers_clock(tmp_path: Path) -> None:
    """Every wait (replies, settle windows after injected bytes, close) runs on the memory carrier's virtual
    clock: a silent listener costs the probe its reply timeout in virtual seconds, never a socket or a sleep."""
    net = MemoryNetwork()
    net.listen(*LAB, protocol.ServerFactory.forProtocol(protocol.Protocol))  # accepts, never says a word
    with pytest.raises(ProbeUnreachable, match=r"no greeting|timed out|timeout"):
        run_probe(in_memory(timeout=30.0), net)
    assert net.clock.seconds() >= 30.0  # the 30 s reply timeout passed, virtually


def test_the_memory_probe_settles_virtually(tmp_path: Path) -> None:
    """Against a correct listener nothing answers the injected NOOP: the probe listens the whole settle window,
    on the virtual clock."""
    net = broken_lab(tmp_path, TLSMode.REQUIRED, None)
    report = run_probe(in_memory(settle=5.0), net)
    assert report.findings == () and report.checks["injection"]["STARTTLS"] == 220
    assert net.clock.seconds() >= 5.0
    assert report.transcript[1] == f"=== Trying {LAB[0]}:{LAB[1]}..."


def test_recipient_refused_everywhere_is_only_a_guess(tmp_path: Path) -> None:
    report = probe_broken(tmp_path, TLSMode.PREFERRED, None, listener={"rat": ("example.org",)})
    assert report.checks["plain"]["plain.RCPT"] == report.checks["tls"]["tls.RCPT"] == 550
    assert (report.policy, report.conclusive, report.findings, report.exit_code) == (TLSMode.PREFERRED, False, (), 1)
    assert "the recipient <postmaster@example.com> is refused everywhere: give --to" in report.notes


# -- real peers (peers): the probe sees what the shipped target profiles declare

PEERS = {
    # name: (kind, setting, policy, verify_client)
    "postfix-none": ("postfix", "none", TLSMode.NO, False),
    "postfix-may": ("postfix", "may", TLSMode.PREFERRED, False),
    "postfix-encrypt": ("postfix", "encrypt", TLSMode.REQUIRED, False),
    "postfix-encrypt-verify": ("postfix", "encrypt", TLSMode.REQUIRED, True),
    "aiosmtpd-plain": ("aiosmtpd", "plain", TLSMode.NO, False),
    "aiosmtpd-tls": ("aiosmtpd", "tls", TLSMode.PREFERRED, False),
    "aiosmtpd-require": ("aiosmtpd", "require", TLSMode.REQUIRED, False),
}


@pytest.fixture(scope="module")
def peer_fleet() -> Iterator[tuple[dict[str, Peer], LabCA]]:
    """Every available peer, started together on its own 127.25.x.y address; stopped together afterwards."""
    root = make_peer_workdir()
    ca = LabCA(root / "state")
    peers: dict[str, Peer] = {}
    for name, (kind, setting, _policy, verify) in PEERS.items():
        module = postfix if kind == "postfix" else aiosmtpd_peer
        if module.unavailable_reason() is not None:
            continue
        address = next_address()
        cert = ca.issue(name, [f"{kind}.peer.test", address])
        pems = (None, None) if setting in ("none", "plain") else (cert.cert_pem, cert.key_pem)
        if kind == "postfix":
            extra = {"verify_client": True, "client_ca_pem": ca.ca_pem} if verify else {}
            peers[name] = PostfixPeer(root / name, address, None, setting, *pems, **extra)  # type: ignore[arg-type]
        else:
            peers[name] = AiosmtpdPeer(root / name, address, None, setting, *pems)  # type: ignore[arg-type]
    start_all(list(peers.values()))
    try:
        yield peers, ca
    finally:
        stop_all(list(peers.values()))
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.peer
@pytest.mark.parametrize("name", list(PEERS))
@pytest_twisted.ensureDeferred
async def test_probe_against_real_peers(peer_fleet: tuple[dict[str, Peer], LabCA], name: str) -> None:
    kind, _setting, policy, verify = PEERS[name]
    module = postfix if kind == "postfix" else aiosmtpd_peer
    reason = module.unavailable_reason()
    require_peer(kind, reason is None, reason or "")
    peers, ca = peer_fleet
    peer = peers[name]
    settings = ProbeSettings(host=peer.address, port=peer.port, timeout=5.0, settle=0.3, ca_pems=(ca.ca_pem,))
    if verify:
        settings = dataclasses.replace(
            settings, client_cert=ca.issue("probe-client", ["client.peer.test"], client=True)
        )
    report = await probe(settings, tcp_carrier(settings, reactor))
    assert (report.policy, report.verify_client, report.conclusive) == (policy, verify, True), report.summary()
    declared = load_profile(REPO / "conformance" / "targets" / f"{name.removesuffix('-verify')}.yaml")
    assert declared.policy is report.policy  # the shipped profile declares what the target does
    if policy is not TLSMode.NO:
        assert report.server_cert_verified is True  # the lab CA issued the peer's certificate for its address
    ids = {f.id for f in report.findings}
    assert "starttls-injection" not in ids and "envelope-across-tls" not in ids  # both fixed upstream long ago
    for finding in report.findings:
        assert set(finding.evidence) <= set(report.transcript)
    assert peer.messages() == []  # the probe never delivers
