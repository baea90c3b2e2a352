"""TLS-RPT from the delivery engine (docs/outbound-reporting.md): the day's report of a domain that publishes
``_smtp._tls`` is built from the engine's attempts at UTC midnight of the virtual clock (or on demand), written
under the appliance state dir with the RFC 8460 file name, and mailed through the queue to the rua address,
where the domain's receiving MTA gets it."""

from __future__ import annotations

import datetime as dt
import email
import gzip
import json
from email.message import Message
from pathlib import Path
from typing import Any

import jsonschema
from outboundlab import OutboundLab

from lab.net.memory import MemoryNetwork
from lab.yamlsource import load_schema

DEC_2_0800 = 1_796_198_400  # Wed Dec  2 08:00:00 2026 UTC
DEC_2 = dt.date(2026, 12, 2)
FILE = "esa.lab.example!dest.test!1796169600!1796255999!20261202.dest.test_esa.lab.example.json.gz"


def lab_at_dec_2(tmp_path: Path, **options: Any) -> OutboundLab:
    net = MemoryNetwork()
    net.clock.advance(DEC_2_0800)
    return OutboundLab(tmp_path, net=net, **options)


def report_of(message: bytes) -> tuple[Message, dict[str, Any]]:
    """The delivered report message and its JSON, checked against the shipped schema."""
    parsed = email.message_from_bytes(message)
    assert parsed.get_content_type() == "multipart/report" and parsed.get_param("report-type") == "tlsrpt"
    text, attachment = parsed.get_payload()
    assert text.get_content_type() == "text/plain"
    assert attachment.get_content_type() == "application/tlsrpt+gzip" and attachment.get_filename() == FILE
    report = json.loads(gzip.decompress(attachment.get_payload(decode=True)))
    jsonschema.Draft202012Validator(load_schema("tlsrpt.schema.json")).validate(report)
    return parsed, report


def test_the_days_report_is_written_and_mailed_at_midnight(tmp_path: Path) -> None:
    lab = lab_at_dec_2(tmp_path, tls="preferred", mx1="absent", sts="testing", tlsrpt=True)
    lab.send()
    lab.send()
    lab.run()  # both delivered in clear on one connection (testing); at midnight the report; then idle
    written = tmp_path / "state" / "tlsrpt" / FILE
    assert written.is_file()
    *mail, carried = lab.mtas["mx1"].messages
    assert len(mail) == 2 and carried.rcpt_to == ["tlsrpt@dest.test"] and carried.mail_from == ""
    parsed, report = report_of(carried.data)
    assert parsed["TLS-Report-Domain"] == "dest.test" and parsed["From"] == "tlsrpt-noreply@esa.lab.example"
    assert json.loads(gzip.decompress(written.read_bytes())) == report
    [policy] = report["policies"]
    assert policy["policy"]["policy-type"] == "sts" and "mode: testing" in policy["policy"]["policy-string"]
    assert policy["summary"] == {"total-successful-session-count": 0, "total-failure-session-count": 1}
    [detail] = policy["failure-details"]
    assert (detail["result-type"], detail["receiving-mx-hostname"], detail["failed-session-count"]) == (
        "starttls-not-supported",
        "mx1.dest.test",
        1,
    )
    assert report["date-range"] == {"start-datetime": "2026-12-02T00:00:00Z", "end-datetime": "2026-12-02T23:59:59Z"}
    assert f"TLS-RPT report domain dest.test day 2026-12-02 file {FILE} MID 3" in lab.texts()
    [sent] = lab.engine.reports.sent  # the report's own delivery does not arm another day's report
    assert sent.mid == 3 and sent.day == DEC_2


def test_an_enforce_report_counts_the_refused_mx_and_goes_to_the_good_one(tmp_path: Path) -> None:
    lab = lab_at_dec_2(
        tmp_path, tls="preferred", mx1="ok", mx1_names=("other.dest.test",), mx2="ok", sts="enforce", tlsrpt=True
    )
    lab.send()
    lab.run()
    assert lab.mtas["mx1"].messages == []
    _message, carried = lab.mtas["mx2"].messages
    assert carried.tls and carried.rcpt_to == ["tlsrpt@dest.test"]
    _, report = report_of(carried.data)
    [policy] = report["policies"]
    assert policy["policy"]["mx-host"] == ["mx1.dest.test", "mx2.dest.test"]
    assert policy["summary"] == {"total-successful-session-count": 1, "total-failure-session-count": 1}
    assert [d["result-type"] for d in policy["failure-details"]] == ["certificate-host-mismatch"]


def test_reports_on_demand(tmp_path: Path) -> None:
    lab = lab_at_dec_2(tmp_path, tls="preferred", mx1="ok", sts="enforce", tlsrpt=True)
    reports = lab.engine.reports
    assert reports is not None
    reports.stop()  # no midnight timer: the lab asks
    lab.send()
    lab.run()
    assert reports.sent == []
    [sent] = reports.send_reports(DEC_2)
    lab.run()
    assert sent.path.name == FILE and sent.rua == ("mailto:tlsrpt@dest.test",)
    _, report = report_of(lab.mtas["mx1"].messages[-1].data)
    assert report["policies"][0]["summary"]["total-successful-session-count"] == 1
    assert reports.send_reports(DEC_2 + dt.timedelta(days=1)) == []  # no session that day


def test_no_report_without_a_tlsrpt_record(tmp_path: Path) -> None:
    lab = lab_at_dec_2(tmp_path, tls="preferred", mx1="ok", sts="enforce")
    lab.send()
    lab.run()
    assert lab.engine.reports is not None and lab.engine.reports.send_reports(DEC_2) == []
    assert not (tmp_path / "state" / "tlsrpt").exists()
