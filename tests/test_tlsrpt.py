"""TLS-RPT (RFC 8460): delivery connections of one UTC day -> the schema-valid JSON report, its file name, gzip,
and the report message."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import gzip
import json
from pathlib import Path

import jsonschema
import pytest

from lab.errors import HarnessError
from lab.outbound.attempt import RESULT_TYPES, DeliveryAttempt, Outcome
from lab.outbound.tlsrpt import (
    Reporter,
    build_report,
    check_report,
    file_name,
    gzipped,
    parse_tlsrpt_txt,
    report_domains,
    report_message,
    write_report,
)
from lab.yamlsource import load_schema

DAY = dt.date(2026, 12, 1)
NOON = dt.datetime(2026, 12, 1, 12, tzinfo=dt.UTC).timestamp()
REPORTER = Reporter("smtplab appliance", "esa.lab.example", "mailto:postmaster@esa.lab.example")
STS = ("version: STSv1", "mode: enforce", "mx: mx1.example.org", "max_age: 86400")
_dcid = iter(range(1, 1000))


def attempt(domain: str = "example.org", at: float = NOON, **facts: object) -> DeliveryAttempt:
    base: dict[str, object] = {
        "mx_host": "mx1.example.org",
        "receiving_ip": "192.0.2.25",
        "sending_ip": "192.168.2.1",
        "tls_setting": "Required (Verify)",
        "policy_type": "sts",
        "policy_strings": STS,
    }
    base.update(facts)
    return DeliveryAttempt(next(_dcid), at, domain, **base)  # type: ignore[arg-type]


GOOD = {"tls": True, "tls_version": "TLSv1.3", "outcome": Outcome.DELIVERED}


def the_day() -> list[DeliveryAttempt]:
    return [
        attempt(**GOOD),
        attempt(**GOOD),
        attempt(result_type="starttls-not-supported", failure_reason="STARTTLS not offered", receiving_helo="mx1"),
        attempt(result_type="starttls-not-supported", failure_reason="STARTTLS not offered", receiving_helo="mx1"),
        attempt(result_type="certificate-not-trusted", mx_host="mx2.example.org", receiving_ip="192.0.2.26"),
        attempt(at=NOON - 86400, **GOOD),  # the day before: not in this report
        attempt(domain="example.net", policy_type="no-policy-found", policy_strings=(), **GOOD),
        attempt(domain="example.org", tls_setting="No", policy_type="no-policy-found", policy_strings=()),  # plain
    ]


def test_the_report_counts_one_day_per_policy() -> None:
    report = build_report(the_day(), "example.org", DAY, REPORTER)
    assert report is not None
    assert report["date-range"] == {"start-datetime": "2026-12-01T00:00:00Z", "end-datetime": "2026-12-01T23:59:59Z"}
    assert (report["organization-name"], report["contact-info"]) == ("smtplab appliance", REPORTER.contact)
    [entry] = report["policies"]  # the plain No route is not a TLS session and adds no no-policy-found entry
    assert entry["policy"] == {
        "policy-type": "sts",
        "policy-string": list(STS),
        "policy-domain": "example.org",
        "mx-host": "mx1.example.org",
    }
    assert entry["summary"] == {"total-successful-session-count": 2, "total-failure-session-count": 3}
    assert entry["failure-details"] == [
        {
            "result-type": "certificate-not-trusted",
            "sending-mta-ip": "192.168.2.1",
            "receiving-mx-hostname": "mx2.example.org",
            "receiving-ip": "192.0.2.26",
            "failed-session-count": 1,
        },
        {
            "result-type": "starttls-not-supported",
            "sending-mta-ip": "192.168.2.1",
            "receiving-mx-hostname": "mx1.example.org",
            "receiving-mx-helo": "mx1",
            "receiving-ip": "192.0.2.25",
            "failed-session-count": 2,
            "failure-reason-code": "STARTTLS not offered",
        },
    ]
    jsonschema.Draft202012Validator(load_schema("tlsrpt.schema.json")).validate(report)


def test_domains_and_policies_are_kept_apart() -> None:
    assert report_domains(the_day(), DAY) == ["example.net", "example.org"]
    other = build_report(the_day(), "EXAMPLE.NET.", DAY, REPORTER)
    assert other is not None
    [entry] = other["policies"]
    assert entry["policy"] == {"policy-type": "no-policy-found", "policy-domain": "example.net"}
    assert "failure-details" not in entry
    assert build_report(the_day(), "example.com", DAY, REPORTER) is None


def test_every_result_type_of_the_lab_is_in_the_schema() -> None:
    schema = load_schema("tlsrpt.schema.json")
    assert tuple(schema["$defs"]["failure"]["properties"]["result-type"]["enum"]) == RESULT_TYPES


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("policies", 0, "policy", "policy_type"), "sts"),
        (("policies", 0, "summary", "total-failure-session-count"), -1),
    ],
)
def test_the_schema_refuses_wrong_names_and_counts(path: tuple[object, ...], value: object) -> None:
    report = build_report(the_day(), "example.org", DAY, REPORTER)
    assert report is not None
    node: object = report
    for key in path[:-1]:
        node = node[key]  # type: ignore[index]
    node[path[-1]] = value  # type: ignore[index]
    with pytest.raises(HarnessError, match=r"tlsrpt\.schema\.json: policies/0/"):
        check_report(report)


def test_file_name_and_gzip(tmp_path: Path) -> None:
    report = build_report(the_day(), "example.org", DAY, REPORTER)
    assert report is not None
    begin = int(dt.datetime(2026, 12, 1, tzinfo=dt.UTC).timestamp())
    name = file_name(report, REPORTER, "example.org")
    assert name == f"esa.lab.example!example.org!{begin}!{begin + 86399}!20261201.example.org_esa.lab.example.json.gz"
    path = write_report(report, REPORTER, "example.org", tmp_path / "tlsrpt")
    assert path.name == name and json.loads(gzip.decompress(path.read_bytes())) == report
    assert gzipped(report) == path.read_bytes()  # the same report gives the same bytes


def test_the_report_message() -> None:
    report = build_report(the_day(), "example.org", DAY, REPORTER)
    assert report is not None
    sent = report_message(
        report, REPORTER, "example.org", ["tlsrpt@example.org"], dt.datetime(2026, 12, 2, 0, 5, tzinfo=dt.UTC)
    )
    message = email.message_from_bytes(sent.as_bytes(), policy=email.policy.default)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "tlsrpt"
    assert message["To"] == "tlsrpt@example.org" and message["From"] == "tlsrpt-noreply@esa.lab.example"
    assert message["TLS-Report-Domain"] == "example.org" and message["TLS-Report-Submitter"] == "esa.lab.example"
    assert message["Subject"] == (
        "Report Domain: example.org Submitter: esa.lab.example Report-ID: <20261201.example.org@esa.lab.example>"
    )
    text, attachment = message.iter_parts()
    assert text.get_content_type() == "text/plain" and "2 successful and 3 failed" in text.get_content()
    assert attachment.get_content_type() == "application/tlsrpt+gzip"
    assert attachment.get_filename() == file_name(report, REPORTER, "example.org")
    assert json.loads(gzip.decompress(attachment.get_content())) == report


@pytest.mark.parametrize(
    ("records", "mailto"),
    [
        (["v=TLSRPTv1; rua=mailto:tlsrpt@example.org"], ("tlsrpt@example.org",)),
        (["v=TLSRPTv1;rua=mailto:a@example.org,https://r.example/x"], ("a@example.org",)),
        (["v=spf1 -all"], None),
        (["v=TLSRPTv1; rua=mailto:a@x", "v=TLSRPTv1; rua=mailto:b@x"], None),
        (["v=TLSRPTv1;"], None),
    ],
)
def test_tlsrpt_txt(records: list[str], mailto: tuple[str, ...] | None) -> None:
    record = parse_tlsrpt_txt(records)
    assert (record.mailto if record else None) == mailto
