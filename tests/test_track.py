"""``smtplab track``: messages found by MID, sender or recipient in a mail log written by the real listener
(inbound, over the memory carrier with real TLS) and the real MailLog DCID writers (outbound)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_listener_memory import Dialogue
from twisted.internet import protocol, task

from lab.appliance.config import load_appliance
from lab.appliance.maillog import MailLog
from lab.appliance.spool import Spool
from lab.cli import main
from lab.net.memory import MemoryNetwork
from lab.smtp.listener import ApplianceRuntime

DEC_1 = 1796083200  # Tue Dec  1 00:00:00 2026 UTC
APPLIANCE = """\
hostname: esa.lab.example
interfaces:
  - {name: PublicNet, address: 192.168.2.1, prefix: 24}
certificates:
  - {name: esa-lab, kind: lab, hostnames: [esa.lab.example]}
listeners:
  - name: Inboundmail
    type: public
    interface: PublicNet
    certificate: esa-lab
    rat: [example.com]
    hat:
      sender_groups:
        - {name: WHITELIST, members: [198.51.100.10]}
        - {name: BLACKLIST, members: [203.0.113.66]}
        - {name: ALL}
      policies:
        TRUSTED: {tls: required}
        ACCEPTED: {tls: preferred}
"""
RDNS = {"198.51.100.10": "mx.partner.example", "198.51.100.50": "mx.secure.example"}
MESSAGE = [b"MAIL FROM:<{sender}>", b"RCPT TO:<{rcpt}>", b"DATA", b"Subject: hi\r\n\r\nhello\r\n.", b"QUIT"]


def _message(sender: str, rcpt: str) -> list[bytes]:
    return [line.replace(b"{sender}", sender.encode()).replace(b"{rcpt}", rcpt.encode()) for line in MESSAGE]


def write_lab_log(root: Path) -> tuple[Path, Path]:
    """A served day: five inbound sessions, then three delivery connections. Returns (mail log, appliance file)."""
    config = root / "appliance.yaml"
    config.write_text(APPLIANCE)
    appliance = load_appliance(config)
    clock = task.Clock()
    clock.advance(DEC_1 + 9 * 3600)
    net = MemoryNetwork(clock)
    log_path = root / "mail.log"
    maillog = MailLog(log_path, clock=clock.seconds)
    runtime = ApplianceRuntime(
        appliance,
        clock=clock,
        spool=Spool(root / "spool"),
        state_dir=root / "state",
        maillog=maillog,
        reverse_dns=lambda ip: (RDNS[ip], True) if ip in RDNS else (None, False),
    )
    net.listen("192.168.2.1", 25, runtime.factory(appliance.listeners[0]))
    tls = [b"EHLO c", b"STARTTLS", b"EHLO c"]
    sessions = [
        ("198.51.100.10", tls + _message("alice@partner.example", "bob@example.com")),  # required, TLS: MID 1
        ("198.51.100.10", [b"EHLO c", b"MAIL FROM:<alice@partner.example>", b"QUIT"]),  # required, no TLS: 530
        ("198.51.100.50", tls + _message("carol@secure.example", "dave@example.com")),  # preferred, TLS: MID 2
        ("198.51.100.20", [b"EHLO c", *_message("eve@plain.example", "bob@example.com")]),  # preferred, plain: MID 3
        ("203.0.113.66", [b"EHLO c", b"QUIT"]),  # blocked: not a TLS connection of the report
    ]
    for source, lines in sessions:
        client = Dialogue(lines)
        net.connect(source, "192.168.2.1", 25, protocol.ClientFactory.forProtocol(lambda c=client: c))
        net.run_until(client.done, timeout=60)
        clock.advance(60)
    # the appliance relays on: MID 1 over TLS, MID 2 into a required-verify failure then a retry, MID 3 plain
    maillog.dcid_new(1, "192.168.2.1", "192.0.2.25", 25)
    maillog.dcid_route(1, "example.com", "mx1.example.com", "Required")
    maillog.dcid_tls_success(1, "TLSv1.3", "TLS_AES_256_GCM_SHA384")
    maillog.delivery_start(1, 1, [0])
    maillog.message_done(1, 1, [0])
    maillog.dcid_close(1)
    maillog.dcid_new(2, "192.168.2.1", "192.0.2.25", 25)
    maillog.dcid_route(2, "example.com", "mx1.example.com", "Required (Verify)")
    maillog.dcid_tls_success(2, "TLSv1.3", "TLS_AES_256_GCM_SHA384")
    maillog.dcid_certificate(2, False, "certificate names mx.other.example")
    maillog.dcid_tls_required(2, "192.0.2.25")
    maillog.delivery_start(2, 2, [0])
    maillog.delayed(2, 2, 0, "TLS was required but the certificate did not verify")
    maillog.dcid_close(2)
    clock.advance(600)
    maillog.dcid_new(3, "192.168.2.1", "192.0.2.26", 25)
    maillog.dcid_route(3, "example.com", "mx2.example.com", "Preferred")
    maillog.dcid_no_starttls(3)
    maillog.delivery_start(3, 2, [0])
    maillog.message_done(3, 2, [0])
    maillog.delivery_start(3, 3, [0])
    maillog.message_done(3, 3, [0])
    maillog.dcid_close(3)
    maillog.close_file()
    return log_path, config


@pytest.fixture(scope="module")
def lab_log(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_lab_log(tmp_path_factory.mktemp("served"))


def track(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["track", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_track_by_mid_shows_inbound_and_outbound_tls(
    lab_log: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = track(capsys, "--log", str(lab_log[0]), "--mid", "2")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("MID 2  Tue Dec  1 09:02:00 2026  From: <carol@secure.example>  To: <dave@example.com>")
    assert lines[1].startswith("  in   ICID 3 from 198.51.100.50 (mx.secure.example, verified)  SG ALL  TLS TLSv1.3 ")
    assert lines[2].startswith("  spool ")
    assert (
        "DCID 2" in lines[3]
        and "TLS Required (Verify): TLSv1.3 TLS_AES_256_GCM_SHA384, certificate unverified" in lines[3]
    )
    assert lines[3].endswith("-> delayed: TLS was required but the certificate did not verify")
    assert (
        "DCID 3" in lines[4]
        and "mx mx2.example.com (192.0.2.26)  TLS Preferred: none (STARTTLS not offered)  -> delivered" in lines[4]
    )


def test_track_by_sender_and_recipient(lab_log: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = track(capsys, "--log", str(lab_log[0]), "--to", "BOB@example.com", "--json")
    assert code == 0
    found = json.loads(out)
    assert [m["mid"] for m in found] == [1, 3]
    assert found[0]["inbound"]["tls"].startswith("TLSv1.3") and found[1]["inbound"]["tls"] == "none"
    assert (
        found[0]["deliveries"][0]["outcome"] == "delivered" and found[0]["deliveries"][0]["tls_setting"] == "Required"
    )
    _, out, _ = track(capsys, "--log", str(lab_log[0]), "--from", "<eve@plain.example>")
    assert out.startswith("MID 3 ") and "ICID 4 from 198.51.100.20 (no rDNS)" in out
    _, out, _ = track(capsys, "--log", str(lab_log[0]), "--from", "nobody@example.com")
    assert out == "no message matches\n"


def test_bad_input_names_file_and_line(
    lab_log: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.log"
    lines = lab_log[0].read_text().splitlines()
    broken.write_text(
        "\n".join([*lines[:3], "Tue Dec  1 09:00:00 2026 Info: something else entirely", *lines[3:]]) + "\n"
    )
    code, out, err = track(capsys, "--log", str(broken), "--mid", "1")
    assert (code, out) == (3, "")
    assert err == f"smtplab: {broken}:4: unknown mail log event: 'something else entirely'\n"
    code, _, err = track(capsys, "--log", str(tmp_path / "missing.log"), "--mid", "1")
    assert (
        code == 3
        and err == f"smtplab: {tmp_path / 'missing.log'}: cannot read the mail log: No such file or directory\n"
    )
    code, _, err = track(capsys, "--log", str(lab_log[0]))
    assert code == 3 and "--mid N, --from ADDR or --to ADDR" in err
    binary = tmp_path / "binary.log"
    binary.write_bytes(b"\xff\xfe\n")
    code, _, err = track(capsys, "--log", str(binary), "--mid", "1")
    assert code == 3 and err == f"smtplab: {binary}:1: not UTF-8 text\n"


def test_two_logs_never_merge_their_ids(
    lab_log: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    again = tmp_path / "restarted.log"
    again.write_text(lab_log[0].read_text())
    _, out, _ = track(capsys, "--log", str(lab_log[0]), "--log", str(again), "--mid", "1", "--json")
    found = json.loads(out)
    assert [(m["log"], len(m["deliveries"])) for m in found] == [(str(lab_log[0]), 1), (str(again), 1)]
