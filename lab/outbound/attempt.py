"""One delivery connection (a DCID) as plain data: what the queue, the mail log, message tracking, the TLS
connections report and the TLS-RPT report all read.

The delivery engine writes one ``DeliveryAttempt`` per connection it opens (or tries to open) to a receiving
MTA; nothing downstream re-reads the mail log text to learn these facts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Outcome(StrEnum):
    """What became of the messages on this connection."""

    DELIVERED = "delivered"  # the receiver accepted the message (250 after DATA)
    DEFERRED = "deferred"  # a temporary failure: the message stays queued for a retry
    BOUNCED = "bounced"  # a permanent failure, or the time in queue ran out: a DSN goes to the sender
    NOT_SENT = "not-sent"  # the connection carried no message (TLS required but not negotiated, ...)


#: RFC 8460 4.3 result types (failure-details.result-type) the lab can produce.
RESULT_TYPES = (
    "starttls-not-supported",
    "certificate-host-mismatch",
    "certificate-expired",
    "certificate-not-trusted",
    "validation-failure",
    "tlsa-invalid",
    "dnssec-invalid",
    "dane-required",
    "sts-policy-fetch-error",
    "sts-policy-invalid",
    "sts-webpki-invalid",
)


@dataclass(frozen=True)
class DeliveryAttempt:
    """One connection from the appliance to a receiving MTA, and what TLS did on it.

    ``tls_setting`` is the destination control applied (No, Preferred, Required, Preferred (Verify),
    Required (Verify)); ``result_type`` is None when TLS succeeded (or was not attempted under No) and otherwise
    the RFC 8460 result type; ``policy_type`` is the RFC 8460 policy-type (``sts`` or ``no-policy-found``).
    """

    dcid: int
    at: float  # seconds on the run's clock when the connection was opened
    domain: str  # the recipient domain (the policy domain of RFC 8460)
    mx_host: str
    receiving_ip: str
    sending_ip: str
    tls_setting: str
    mids: tuple[int, ...] = ()
    receiving_helo: str | None = None
    tls: bool = False
    tls_version: str | None = None
    cipher: str | None = None
    certificate_verified: bool | None = None  # None: not checked
    result_type: str | None = None
    failure_reason: str | None = None  # RFC 8460 failure-reason-code / the operator's one-line reason
    outcome: Outcome = Outcome.NOT_SENT
    policy_type: str = "no-policy-found"
    policy_strings: tuple[str, ...] = field(default_factory=tuple)
