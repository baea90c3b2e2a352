"""The mail log: exact lines of the documented grammar, counters, sinks, and reading lines back."""

from __future__ import annotations

import calendar
import io
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lab.appliance.maillog import GRAMMAR, TAIL_LINES, MailLog, format_timestamp, parse_line
from lab.errors import BadInput
from lab.policy.modes import Behaviour, ClientCert

T0 = float(calendar.timegm((2026, 12, 1, 19, 40, 5, 0, 0, 0)))
STAMP = "Tue Dec  1 19:40:05 2026"


def fixed_log(**kwargs) -> MailLog:
    return MailLog(clock=lambda: T0, **kwargs)


def test_timestamp_format_is_fixed_width() -> None:
    assert format_timestamp(T0) == STAMP
    assert format_timestamp(T0 + 10 * 86400) == "Fri Dec 11 19:40:05 2026"
    assert format_timestamp(0) == "Thu Jan  1 00:00:00 1970"  # a fresh virtual Clock


def test_spec_examples_verbatim() -> None:
    log = fixed_log()
    log.new_connection(5, "PublicNet", "192.168.2.1", "198.51.100.7", "mx.example.net", True)
    log.policy(5, Behaviour.ACCEPT, "UNKNOWNLIST", "ALL")
    log.tls_success(5, "TLSv1.3", "TLS_AES_256_GCM_SHA384")
    log.tls_failed(6, "no shared cipher")
    log.injection_discarded(5, 23, b"MAIL FROM:<x>\r\nRCPT TO:")
    log.mid_start(1, 5)
    log.mid_from(1, 5, "a@example.net")
    log.mid_rcpt(1, 5, 0, "<b@example.com>")
    log.mid_ready(1, 1234)
    log.close(5)
    assert [line.removeprefix(STAMP + " ") for line in log.lines] == [
        "Info: New SMTP ICID 5 interface PublicNet (192.168.2.1) address 198.51.100.7"
        " reverse dns host mx.example.net verified yes",
        "Info: ICID 5 ACCEPT SG UNKNOWNLIST match ALL",
        "Info: ICID 5 TLS success protocol TLSv1.3 cipher TLS_AES_256_GCM_SHA384",
        "Info: ICID 6 TLS failed: no shared cipher",
        "Warning: ICID 5 STARTTLS command injection: discarded 23 bytes received after STARTTLS:"
        " 'MAIL FROM:<x>\\r\\nRCPT TO:'",
        "Info: Start MID 1 ICID 5",
        "Info: MID 1 ICID 5 From: <a@example.net>",
        "Info: MID 1 ICID 5 RID 0 To: <b@example.com>",
        "Info: MID 1 ready 1234 bytes",
        "Info: ICID 5 close",
    ]


def test_counters_start_at_one_and_are_independent() -> None:
    log = MailLog()
    assert [log.next_icid(), log.next_icid(), log.next_mid(), log.next_icid()] == [1, 2, 1, 3]


def test_file_sink_is_written_through_and_appended(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "mail.log"
    log = fixed_log(sink=path)
    log.mid_ready(1, 10)
    assert path.read_text() == f"{STAMP} Info: MID 1 ready 10 bytes\n"  # before any close: flushed per line
    log.close_file()
    with fixed_log(sink=path) as again:
        again.mid_ready(2, 20)
    assert path.read_text().splitlines()[1] == f"{STAMP} Info: MID 2 ready 20 bytes"


def test_stream_sink_and_echo() -> None:
    stream, echoed = io.StringIO(), []
    log = fixed_log(sink=stream, echo=echoed.append)
    line = log.close(3, by="server")
    assert line == f"{STAMP} Info: ICID 3 close by server"
    assert stream.getvalue() == line + "\n" and echoed == [line] and list(log.lines) == [line]


def test_memory_is_bounded_while_the_file_grows(tmp_path: Path) -> None:
    """A long-running ``smtplab serve`` writes every line through; the object keeps only a fixed tail."""
    path = tmp_path / "mail.log"
    with fixed_log(sink=path, tail=50) as log:
        for icid in range(1, 5001):
            log.close(icid)
        assert len(log.lines) == 50 and log.lines[-1].endswith("ICID 5000 close")
        assert log.lines[0].endswith("ICID 4951 close")
    assert len(path.read_text().splitlines()) == 5000


def test_default_tail_is_bounded_and_echo_sees_every_line() -> None:
    seen: list[str] = []
    log = fixed_log(echo=seen.append)
    assert log.lines.maxlen == TAIL_LINES
    for icid in range(TAIL_LINES + 10):
        log.close(icid)
    assert len(log.lines) == TAIL_LINES and len(seen) == TAIL_LINES + 10


def test_clock_is_read_per_line() -> None:
    now = [T0]
    log = MailLog(clock=lambda: now[0])
    log.mid_start(1, 1)
    now[0] += 65
    log.mid_ready(1, 5)
    assert [parse_line(x)["time"] for x in log.lines] == [T0, T0 + 65]


def test_injection_preview_is_escaped_and_cut() -> None:
    log = fixed_log()
    data = b"QUIT'\\\x00\tZ" + b"A" * 100
    line = log.injection_discarded(9, len(data), data)
    preview = parse_line(line)["preview"]
    assert preview.startswith("QUIT\\'\\\\\\x00\\tZAAA") and preview.endswith("A...")
    assert len(preview) == len("QUIT\\'\\\\\\x00\\tZ") + 64 - 9 + 3


def test_injection_preview_accepts_buffers_and_text() -> None:
    log = fixed_log()
    expected = "ICID 1 STARTTLS command injection: discarded 6 bytes received after STARTTLS: 'RSET\\r\\n'"
    for preview in (b"RSET\r\n", bytearray(b"RSET\r\n"), "RSET\r\n"):
        assert log.injection_discarded(1, 6, preview).endswith(expected)


def test_control_characters_cannot_forge_lines() -> None:
    log = fixed_log()
    line = log.tls_failed(4, "bad\r\nTue Dec  1 19:40:05 2026 Info: MID 9 ready 1 bytes")
    assert "\n" not in line and "\r" not in line
    assert parse_line(line)["event"] == "tls_failed"
    assert len(log.lines) == 1


CASES = [
    (
        lambda log: log.new_connection(5, "PublicNet", "192.168.2.1", "198.51.100.7", None, False),
        {"event": "new_connection", "icid": 5, "interface": "PublicNet", "interface_addr": "192.168.2.1"}
        | {"peer_ip": "198.51.100.7", "rdns": None, "verified": False},
    ),
    (
        lambda log: log.policy(5, "reject", "BLACKLIST", "10.1.", "BLOCKED"),
        {"event": "policy", "behaviour": "REJECT", "group": "BLACKLIST", "member": "10.1.", "policy": "BLOCKED"},
    ),
    (
        lambda log: log.tls_success(5, "TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256"),
        {"event": "tls_success", "protocol": "TLSv1.2", "cipher": "ECDHE-ECDSA-AES128-GCM-SHA256"},
    ),
    (lambda log: log.tls_failed(6, "unsupported protocol"), {"event": "tls_failed", "reason": "unsupported protocol"}),
    (lambda log: log.demo_certificate(5), {"event": "demo_certificate", "icid": 5, "level": "Warning"}),
    (
        lambda log: log.client_cert(5, ClientCert.VERIFIED, "CN=client.lab.example,O=Lab Org"),
        {"event": "client_cert", "state": "verified", "subject": "CN=client.lab.example,O=Lab Org"},
    ),
    (lambda log: log.client_cert(5, ClientCert.NONE, None), {"event": "client_cert", "state": "none"}),
    (
        lambda log: log.injection_discarded(5, 6, b"NOOP\r\n"),
        {"event": "injection_discarded", "nbytes": 6, "preview": "NOOP\\r\\n"},
    ),
    (
        lambda log: log.refused(7, "TCPREFUSE SG BLACKLIST"),
        {"event": "refused", "icid": 7, "reason": "TCPREFUSE SG BLACKLIST"},
    ),
    (
        lambda log: log.message_refused(7, "530 5.7.0 Must issue a STARTTLS command first"),
        {"event": "message_refused", "reason": "530 5.7.0 Must issue a STARTTLS command first"},
    ),
    (
        lambda log: log.rcpt_rejected(7, 1, "x@elsewhere.test", "not in RAT"),
        {"event": "rcpt_rejected", "rid": 1, "addr": "<x@elsewhere.test>", "reason": "not in RAT"},
    ),
    (lambda log: log.protocol_error(7, "bare LF"), {"event": "protocol_error", "what": "bare LF"}),
    (lambda log: log.close(7), {"event": "close", "icid": 7, "by": None}),
    (lambda log: log.mid_start(2, 7), {"event": "mid_start", "mid": 2, "icid": 7}),
    (lambda log: log.mid_from(2, 7, ""), {"event": "mid_from", "addr": "<>"}),
    (lambda log: log.mid_rcpt(2, 7, 3, "b@example.com"), {"event": "mid_rcpt", "rid": 3, "addr": "<b@example.com>"}),
    (lambda log: log.mid_ready(2, 99), {"event": "mid_ready", "mid": 2, "nbytes": 99}),
    (
        lambda log: log.mid_spooled(2, Path("/spool/In bound/new/1.M0P1Q1.esa")),
        {"event": "mid_spooled", "path": "/spool/In bound/new/1.M0P1Q1.esa"},
    ),
    (
        lambda log: log.spool_leftover(Path("/spool/In (1)/tmp/1.M0P1Q1.esa"), 1234, delivered=False),
        {"event": "spool_leftover", "path": "/spool/In (1)/tmp/1.M0P1Q1.esa", "nbytes": 1234}
        | {"state": "incomplete", "level": "Warning"},
    ),
    (
        lambda log: log.spool_leftover("tmp/x", 0, delivered=True),
        {"event": "spool_leftover", "path": "tmp/x", "nbytes": 0, "state": "delivered"},
    ),
    (
        lambda log: log.dcid_new(8, "192.168.2.1", "203.0.113.25", 25),
        {"event": "dcid_new", "dcid": 8, "interface_addr": "192.168.2.1", "peer_ip": "203.0.113.25", "port": 25},
    ),
    (
        lambda log: log.dcid_route(8, "bank.example", "mx.bank.example", "Required (Verify)"),
        {"event": "dcid_route", "domain": "bank.example", "mx": "mx.bank.example", "setting": "Required (Verify)"},
    ),
    (lambda log: log.delivery_start(8, 1, [0, 2]), {"event": "delivery_start", "mid": 1, "rids": [0, 2]}),
    (
        lambda log: log.dcid_tls_success(8, "TLSv1.3", "TLS_AES_256_GCM_SHA384"),
        {"event": "dcid_tls_success", "dcid": 8, "protocol": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384"},
    ),
    (
        lambda log: log.dcid_tls_failed(8, "no shared cipher"),
        {"event": "dcid_tls_failed", "reason": "no shared cipher"},
    ),
    (
        lambda log: log.dcid_certificate(8, False, "certificate has expired"),
        {"event": "dcid_certificate", "state": "unverified", "reason": "certificate has expired", "level": "Warning"},
    ),
    (lambda log: log.dcid_certificate(8, True), {"event": "dcid_certificate", "state": "verified", "reason": None}),
    (lambda log: log.dcid_no_starttls(8), {"event": "dcid_no_starttls", "dcid": 8}),
    (
        lambda log: log.dcid_tls_required(8, "203.0.113.25"),
        {"event": "dcid_tls_required", "peer_ip": "203.0.113.25", "level": "Warning"},
    ),
    (lambda log: log.message_done(8, 1, [0]), {"event": "message_done", "dcid": 8, "mid": 1, "rids": [0]}),
    (
        lambda log: log.delayed(8, 1, 0, "TLS was required"),
        {"event": "delayed", "mid": 1, "rid": 0, "reason": "TLS was required"},
    ),
    (
        lambda log: log.bounced(8, 1, 0, "5.4.7 delivery time expired"),
        {"event": "bounced", "rid": 0, "reason": "5.4.7 delivery time expired"},
    ),
    (lambda log: log.dcid_close(8), {"event": "dcid_close", "dcid": 8}),
    (
        lambda log: log.dcid_error(8, "greeting 421 4.3.2 busy"),
        {"event": "dcid_error", "dcid": 8, "reason": "greeting 421 4.3.2 busy"},
    ),
    (
        lambda log: log.alert("warning", "system", "TLS was required for bank.example"),
        {
            "event": "alert",
            "level": "Warning",
            "severity": "Warning",
            "alert_class": "System",
            "text": "TLS was required for bank.example",
        },
    ),
    (
        lambda log: log.alert("Information", "System", "queue drained"),
        {"event": "alert", "level": "Info", "severity": "Information"},
    ),
    (
        lambda log: log.dcid_mtasts(9, "enforce", "mx1.dest.test", "certificate-host-mismatch", "not delivered"),
        {
            "event": "dcid_mtasts",
            "level": "Warning",
            "dcid": 9,
            "mode": "enforce",
            "mx": "mx1.dest.test",
            "result": "certificate-host-mismatch",
            "action": "not delivered",
        },
    ),
    (
        lambda log: log.dcid_mtasts(9, "testing", "mx1.dest.test", None),
        {"event": "dcid_mtasts", "level": "Info", "result": "ok", "action": None},
    ),
    (
        lambda log: log.mtasts_policy("dest.test", "enforce", 86400, "fetched"),
        {"event": "mtasts_policy", "domain": "dest.test", "mode": "enforce", "max_age": 86400, "source": "fetched"},
    ),
    (
        lambda log: log.mtasts_error("dest.test", "sts-policy-fetch-error", "HTTP 404"),
        {"event": "mtasts_error", "level": "Warning", "result_type": "sts-policy-fetch-error", "reason": "HTTP 404"},
    ),
    (
        lambda log: log.tlsrpt_report("dest.test", "2026-12-02", "esa!dest.test!1!2!x.json.gz", 3),
        {
            "event": "tlsrpt_report",
            "domain": "dest.test",
            "day": "2026-12-02",
            "file": "esa!dest.test!1!2!x.json.gz",
            "mid": 3,
        },
    ),
]


@pytest.mark.parametrize(("call", "expected"), CASES)
def test_every_event_reads_back(call, expected: dict) -> None:
    fields = parse_line(call(fixed_log()))
    assert fields["timestamp"] == STAMP and fields["time"] == T0
    assert fields.get("level", "Info") == expected.get("level", fields["level"])
    for key, value in expected.items():
        assert fields[key] == value, key


def test_the_cases_cover_the_whole_grammar() -> None:
    covered = {expected["event"] for _, expected in CASES} | {"new_connection", "mid_ready"}
    assert covered == set(GRAMMAR)


@settings(max_examples=200, deadline=None)
@given(icid=st.integers(min_value=1, max_value=10**9), reason=st.text(max_size=200))
def test_any_reason_stays_one_parseable_line(icid: int, reason: str) -> None:
    line = fixed_log().tls_failed(icid, reason)
    assert line.isascii() and line.isprintable() and len(line.splitlines()) == 1
    fields = parse_line(line)
    assert (fields["event"], fields["icid"]) == ("tls_failed", icid)


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=200))
def test_any_injected_bytes_give_a_parseable_line(data: bytes) -> None:
    line = fixed_log().injection_discarded(1, len(data), data)
    fields = parse_line(line)
    assert fields["event"] == "injection_discarded" and fields["nbytes"] == len(data)


@pytest.mark.parametrize(
    "line",
    ["", "garbage", f"{STAMP} Info: something else happened", f"{STAMP} Info: ICID x close"],
)
def test_lines_outside_the_grammar_are_bad_input(line: str) -> None:
    with pytest.raises(BadInput):
        parse_line(line)


def test_flush_soon_writes_the_lines_of_a_turn_at_once(tmp_path: Path) -> None:
    """``smtplab serve`` flushes once per reactor turn: one flush is asked for, whatever the number of lines."""
    path = tmp_path / "mail.log"
    asked: list[object] = []
    log = MailLog(path, clock=lambda: 1764618005.0, flush_soon=asked.append)
    log.new_connection(1, "Management", "127.0.0.1", "127.0.0.2", None, False)
    log.close(1)
    assert len(asked) == 1
    log.flush()
    assert [parse_line(line)["event"] for line in path.read_text().splitlines()] == ["new_connection", "close"]
    log.close(2)
    assert len(asked) == 2  # a new turn, a new flush
    log.close_file()  # flushes what is left
    assert path.read_text().splitlines()[-1].endswith("ICID 2 close")


def test_text_outside_printable_ascii_is_still_escaped() -> None:
    log = MailLog(None, clock=lambda: 0.0)
    line = log.protocol_error(1, "bad\r\nline\x00 é")
    assert line.endswith(r"protocol error: bad\r\nline\x00 \xe9")
