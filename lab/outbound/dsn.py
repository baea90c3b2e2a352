"""Delivery status notifications (RFC 3464): the bounce a sender gets when a message could not be delivered.

``multipart/report; report-type=delivery-status`` (RFC 6522) with three parts: a human-readable explanation,
the ``message/delivery-status`` fields (per message: Reporting-MTA, Arrival-Date; per recipient:
Final-Recipient, Action, Status, Remote-MTA, Diagnostic-Code, Last-Attempt-Date) and the original message's
headers (``text/rfc822-headers``). It goes to the envelope sender with the null reverse-path, so that it can
never cause another DSN (RFC 5321 6.1).
"""

from __future__ import annotations

import email.utils
from collections.abc import Sequence
from dataclasses import dataclass

MAX_HEADER_BYTES = 64 * 1024  # the original's headers quoted back at most


@dataclass(frozen=True)
class FailedRecipient:
    address: str
    status: str  # RFC 3463, e.g. 5.7.10 or 4.4.7
    diagnostic: str  # the last reply (``smtp; 550 5.1.1 no such user``) or the appliance's own reason
    remote_mta: str | None = None


def build_dsn(
    *,
    reporting_mta: str,
    mid: int,
    sender: str,
    recipients: Sequence[FailedRecipient],
    original: bytes,
    arrival: float,
    now: float,
) -> bytes:
    """The DSN for the ``recipients`` of message ``mid``, as the bytes of a message (CRLF line ends)."""
    boundary = f"smtplab-dsn-{mid}-{int(now)}"
    date = email.utils.formatdate(now, usegmt=True)
    addresses = ", ".join(r.address for r in recipients)
    human = [
        f"This is the mail system at host {reporting_mta}.",
        "",
        "Your message could not be delivered to one or more recipients and has been returned.",
        "",
        *(f"<{r.address}>: {r.diagnostic}" for r in recipients),
    ]
    per_message = [
        f"Reporting-MTA: dns; {reporting_mta}",
        f"Arrival-Date: {email.utils.formatdate(arrival, usegmt=True)}",
    ]
    per_recipient: list[str] = []
    for r in recipients:
        per_recipient += [
            "",
            f"Final-Recipient: rfc822; {r.address}",
            "Action: failed",
            f"Status: {r.status}",
            *([f"Remote-MTA: dns; {r.remote_mta}"] if r.remote_mta else []),
            f"Diagnostic-Code: smtp; {_one_line(r.diagnostic)[:900]}",
            f"Last-Attempt-Date: {date}",
        ]
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{sender}>",
        f"Subject: Undelivered Mail Returned to Sender ({_one_line(addresses)[:200]})",
        f"Date: {date}",
        f"Message-ID: <dsn.{mid}.{int(now)}@{reporting_mta}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated delivery status notification.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "Content-Description: Notification",
        "",
        *human,
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "Content-Description: Delivery report",
        "",
        *per_message,
        *per_recipient,
        "",
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        "Content-Description: Undelivered Message Headers",
        "",
        *headers_of(original),
        "",
        f"--{boundary}--",
        "",
    ]
    return "\r\n".join(_ascii(line) for line in lines).encode("ascii")


def headers_of(message: bytes) -> list[str]:
    """The header lines of ``message`` (up to the first empty line), at most ``MAX_HEADER_BYTES``."""
    head = message[:MAX_HEADER_BYTES].replace(b"\r\n", b"\n")
    head = head.split(b"\n\n", 1)[0]
    return [line.decode("ascii", "replace") for line in head.split(b"\n") if line]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii")
