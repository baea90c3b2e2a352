"""SMTP TLS Reporting (RFC 8460): one UTC day of delivery connections -> the aggregate JSON report per policy
domain, checked against ``lab/schemas/tlsrpt.schema.json``, gzipped under the RFC's file name, and the report
message (``multipart/report; report-type="tlsrpt"``) addressed to the domain's ``rua``.

Input is the ``DeliveryAttempt`` records the delivery engine keeps; nothing here reads the mail log.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

import jsonschema

from lab.errors import HarnessError
from lab.outbound.attempt import DeliveryAttempt
from lab.yamlsource import load_schema

SCHEMA = "tlsrpt.schema.json"
MEDIA_TYPE = "application/tlsrpt+gzip"


@dataclass(frozen=True)
class TlsRptRecord:
    """The ``_smtp._tls.<domain>`` TXT record: where reports go (only ``mailto:`` is delivered in the lab)."""

    rua: tuple[str, ...]

    @property
    def mailto(self) -> tuple[str, ...]:
        return tuple(uri[len("mailto:") :] for uri in self.rua if uri.lower().startswith("mailto:"))


def parse_tlsrpt_txt(records: Sequence[str]) -> TlsRptRecord | None:
    """RFC 8460 3: the one record starting ``v=TLSRPTv1`` with a ``rua`` of comma-separated URIs; else None."""
    found = [r for r in records if r.replace(" ", "").startswith("v=TLSRPTv1;")]
    if len(found) != 1:
        return None
    for part in found[0].split(";")[1:]:
        key, sep, value = part.strip().partition("=")
        if sep and key.strip() == "rua":
            uris = tuple(uri.strip() for uri in value.split(",") if uri.strip())
            return TlsRptRecord(uris) if uris else None
    return None


@dataclass(frozen=True)
class Reporter:
    """Who writes the reports: ``submitter`` is the sending domain (the file name's and the mail's)."""

    organization: str
    submitter: str
    contact: str

    @property
    def sender(self) -> str:
        return f"tlsrpt-noreply@{self.submitter}"


def utc_day(day: dt.date) -> tuple[dt.datetime, dt.datetime]:
    """The report period: 00:00:00 to 23:59:59 UTC of ``day`` (inclusive bounds, as RFC 8460's example)."""
    start = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
    return start, start + dt.timedelta(days=1, seconds=-1)


def _stamp(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _in_day(attempt: DeliveryAttempt, day: dt.date) -> bool:
    return dt.datetime.fromtimestamp(attempt.at, dt.UTC).date() == day


def _counts_as_session(attempt: DeliveryAttempt) -> bool:
    """A session TLS-RPT speaks of: TLS was negotiated, or tried and failed (a plain ``No`` route is neither)."""
    return attempt.tls or attempt.result_type is not None


def _policy_key(attempt: DeliveryAttempt) -> tuple[str, tuple[str, ...]]:
    return attempt.policy_type, tuple(attempt.policy_strings)


def _mx_patterns(policy_strings: Sequence[str]) -> list[str]:
    return [line.partition(":")[2].strip() for line in policy_strings if line.partition(":")[0].strip() == "mx"]


def _policy_entry(domain: str, key: tuple[str, tuple[str, ...]], attempts: list[DeliveryAttempt]) -> dict[str, Any]:
    policy_type, strings = key
    policy: dict[str, Any] = {"policy-type": policy_type}
    if strings:
        policy["policy-string"] = list(strings)
    policy["policy-domain"] = domain
    patterns = _mx_patterns(strings) if policy_type == "sts" else []
    if patterns:
        policy["mx-host"] = patterns[0] if len(patterns) == 1 else patterns
    failures = Counter(
        (a.result_type, a.sending_ip, a.mx_host, a.receiving_helo, a.receiving_ip, a.failure_reason)
        for a in attempts
        if a.result_type is not None
    )
    entry: dict[str, Any] = {
        "policy": policy,
        "summary": {
            "total-successful-session-count": sum(1 for a in attempts if a.result_type is None),
            "total-failure-session-count": sum(failures.values()),
        },
    }
    details = []
    for (result_type, sending_ip, mx_host, helo, receiving_ip, reason), count in sorted(
        failures.items(), key=lambda item: tuple(str(part) for part in item[0])
    ):
        detail: dict[str, Any] = {"result-type": result_type, "sending-mta-ip": sending_ip}
        detail["receiving-mx-hostname"] = mx_host
        if helo:
            detail["receiving-mx-helo"] = helo
        detail["receiving-ip"] = receiving_ip
        detail["failed-session-count"] = count
        if reason:
            detail["failure-reason-code"] = reason
        details.append(detail)
    if details:
        entry["failure-details"] = details
    return entry


def build_report(
    attempts: Iterable[DeliveryAttempt], policy_domain: str, day: dt.date, reporter: Reporter
) -> dict[str, Any] | None:
    """The RFC 8460 report of ``policy_domain`` for the UTC ``day``; None when no session of that day concerns it."""
    domain = policy_domain.rstrip(".").lower()
    chosen = [a for a in attempts if a.domain.lower() == domain and _in_day(a, day) and _counts_as_session(a)]
    if not chosen:
        return None
    groups: dict[tuple[str, tuple[str, ...]], list[DeliveryAttempt]] = {}
    for attempt in sorted(chosen, key=lambda a: (a.at, a.dcid)):
        groups.setdefault(_policy_key(attempt), []).append(attempt)
    start, end = utc_day(day)
    report = {
        "organization-name": reporter.organization,
        "date-range": {"start-datetime": _stamp(start), "end-datetime": _stamp(end)},
        "contact-info": reporter.contact,
        "report-id": f"{start:%Y%m%d}.{domain}@{reporter.submitter}",
        "policies": [_policy_entry(domain, key, group) for key, group in groups.items()],
    }
    check_report(report)
    return report


def check_report(report: dict[str, Any]) -> None:
    """The shipped schema's verdict; a report the lab wrote that fails it is the lab's bug (HarnessError)."""
    errors = sorted(jsonschema.Draft202012Validator(load_schema(SCHEMA)).iter_errors(report), key=str)
    if errors:
        where = "/".join(str(p) for p in errors[0].absolute_path) or "(top)"
        raise HarnessError(f"TLS-RPT report does not match {SCHEMA}: {where}: {errors[0].message}")


def report_domains(attempts: Iterable[DeliveryAttempt], day: dt.date) -> list[str]:
    """The policy domains that had a session on ``day``: one report each."""
    return sorted({a.domain.lower() for a in attempts if _in_day(a, day) and _counts_as_session(a)})


def file_name(report: dict[str, Any], reporter: Reporter, policy_domain: str) -> str:
    """RFC 8460 5.1: ``sender!policy-domain!begin!end!unique-id.json.gz`` with UNIX timestamps."""
    begin, end = (
        int(dt.datetime.strptime(report["date-range"][key], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp())
        for key in ("start-datetime", "end-datetime")
    )
    unique = "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in report["report-id"])
    return f"{reporter.submitter}!{policy_domain}!{begin}!{end}!{unique}.json.gz"


def gzipped(report: dict[str, Any]) -> bytes:
    """The report as gzip (``mtime=0``: the same report gives the same bytes)."""
    return gzip.compress(json.dumps(report, indent=2).encode("utf-8") + b"\n", mtime=0)


def write_report(report: dict[str, Any], reporter: Reporter, policy_domain: str, directory: Path) -> Path:
    """``directory/<file name>``; returns the path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / file_name(report, reporter, policy_domain)
    path.write_bytes(gzipped(report))
    return path


def report_message(
    report: dict[str, Any], reporter: Reporter, policy_domain: str, rua: Sequence[str], now: dt.datetime
) -> EmailMessage:
    """RFC 8460 5.3: the report by mail, a human-readable part and the gzipped JSON as application/tlsrpt+gzip."""
    message = EmailMessage()
    message["From"] = reporter.sender
    message["To"] = ", ".join(rua)
    message["Date"] = format_datetime(now.astimezone(dt.UTC))
    message["Message-ID"] = make_msgid(domain=reporter.submitter)
    message["Subject"] = (
        f"Report Domain: {policy_domain} Submitter: {reporter.submitter} Report-ID: <{report['report-id']}>"
    )
    message["TLS-Report-Domain"] = policy_domain
    message["TLS-Report-Submitter"] = reporter.submitter
    policies = report["policies"]
    ok = sum(p["summary"]["total-successful-session-count"] for p in policies)
    failed = sum(p["summary"]["total-failure-session-count"] for p in policies)
    message.set_content(
        f"This is an aggregate TLS report from {reporter.organization} for {policy_domain}\n"
        f"({report['date-range']['start-datetime']} to {report['date-range']['end-datetime']}):\n"
        f"{ok} successful and {failed} failed TLS sessions.\n"
    )
    message.add_attachment(
        gzipped(report),
        maintype="application",
        subtype="tlsrpt+gzip",
        filename=file_name(report, reporter, policy_domain),
    )
    message.set_type("multipart/report")  # keeps the boundary; RFC 6522 with RFC 8460's report-type
    message.set_param("report-type", "tlsrpt")
    return message
