"""Destination controls: which rules the appliance applies when it delivers to a domain (docs/rules.md §6).

Pure data and decisions, no I/O: the lookup of a recipient domain's entry (an exact domain, then the nearest
``.parent`` entry covering subdomains, then the default), the TLS decision table (setting x what happened at
STARTTLS -> go on in TLS, go on in the clear, or quit and defer), and the bounce profile's retry schedule.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum


class DestinationTLS(StrEnum):
    """The five TLS settings of a destination control, spelt as the appliance prints them."""

    NO = "No"  # Postfix none
    PREFERRED = "Preferred"  # Postfix may
    REQUIRED = "Required"  # Postfix encrypt
    PREFERRED_VERIFY = "Preferred (Verify)"
    REQUIRED_VERIFY = "Required (Verify)"  # Postfix verify / secure

    @property
    def attempts_tls(self) -> bool:
        return self is not DestinationTLS.NO

    @property
    def required(self) -> bool:
        return self in (DestinationTLS.REQUIRED, DestinationTLS.REQUIRED_VERIFY)

    @property
    def verifies(self) -> bool:
        """Is the receiver's certificate checked (and the check logged)?"""
        return self in (DestinationTLS.PREFERRED_VERIFY, DestinationTLS.REQUIRED_VERIFY)


_SPELLINGS = {
    "no": DestinationTLS.NO,
    "none": DestinationTLS.NO,
    "off": DestinationTLS.NO,
    "preferred": DestinationTLS.PREFERRED,
    "may": DestinationTLS.PREFERRED,
    "required": DestinationTLS.REQUIRED,
    "encrypt": DestinationTLS.REQUIRED,
    "preferred-verify": DestinationTLS.PREFERRED_VERIFY,
    "required-verify": DestinationTLS.REQUIRED_VERIFY,
    "verify": DestinationTLS.REQUIRED_VERIFY,
    "secure": DestinationTLS.REQUIRED_VERIFY,
}


def parse_destination_tls(text: str) -> DestinationTLS | None:
    """``Preferred (Verify)``, ``preferred-verify``, ``PREFERRED_VERIFY``, Postfix's ``may`` ... or None."""
    key = text.strip().lower().replace("(", " ").replace(")", " ").replace("_", " ").replace("-", " ")
    return _SPELLINGS.get("-".join(key.split()))


#: The spellings the configuration accepts, for error messages.
DESTINATION_TLS_SPELLINGS = "no, preferred, required, preferred-verify, required-verify (or none, may, encrypt)"


class TLSEvent(StrEnum):
    """What happened when the appliance tried TLS on a delivery connection."""

    NOT_ADVERTISED = "not-advertised"  # the EHLO reply had no STARTTLS (before the 220)
    REFUSED = "refused"  # STARTTLS answered with something else than 220, e.g. 454 (before the 220)
    FAILED_AFTER_220 = "failed-after-220"  # the handshake failed after the 220 (garbage, a fatal alert, a close)
    UNVERIFIED = "unverified"  # TLS is up, the certificate did not verify
    OK = "ok"  # TLS is up with a certificate that verified (or that was not checked)


class Next(StrEnum):
    TLS = "tls"  # deliver over TLS on this connection
    CLEAR = "clear"  # deliver in the clear on this connection
    DEFER = "defer"  # send nothing on this connection: QUIT, the message stays queued


def before_220(event: TLSEvent) -> bool:
    """Did TLS fail before the 220 to STARTTLS (so that nothing of TLS had started)?"""
    return event in (TLSEvent.NOT_ADVERTISED, TLSEvent.REFUSED)


def decide(setting: DestinationTLS, event: TLSEvent) -> Next:
    """The one TLS decision table of the delivery client (docs/rules.md §6).

    No never asks for TLS (its event is always NOT_ADVERTISED, or it is not consulted). Preferred settings fall
    back to the clear only when the failure came before the 220; an error after the 220 leaves the connection
    unusable for plaintext, so the message is deferred. Required settings never send without TLS, and
    Required (Verify) not without a verified certificate either.
    """
    if setting is DestinationTLS.NO:
        return Next.CLEAR
    if event is TLSEvent.OK:
        return Next.TLS
    if event is TLSEvent.UNVERIFIED:
        return Next.DEFER if setting is DestinationTLS.REQUIRED_VERIFY else Next.TLS
    if event is TLSEvent.FAILED_AFTER_220 or setting.required:
        return Next.DEFER
    return Next.CLEAR


def result_type(event: TLSEvent, certificate_problem: str | None = None) -> str | None:
    """The RFC 8460 4.3 result type of a TLS event; ``certificate_problem`` is that of an UNVERIFIED one."""
    if event in (TLSEvent.NOT_ADVERTISED, TLSEvent.REFUSED):
        return "starttls-not-supported"
    if event is TLSEvent.FAILED_AFTER_220:
        return "validation-failure"
    if event is TLSEvent.UNVERIFIED:
        return certificate_problem or "certificate-not-trusted"
    return None


# -- the bounce profile -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BounceProfile:
    """How long and how often a deferred message is retried (the appliance's bounce profile).

    The wait before retry ``n`` (1-based) doubles from ``initial_wait`` up to ``max_wait``; a message is bounced
    when it has been retried ``max_retries`` times or has been in the queue ``max_time_in_queue`` seconds.
    """

    name: str = "Default"
    initial_wait: float = 60.0
    max_wait: float = 3600.0
    max_retries: int = 100
    max_time_in_queue: float = 259200.0  # 72 hours
    send_bounces: bool = True  # a DSN to the sender when the message is bounced

    def wait_before(self, retry: int) -> float:
        """Seconds from the failed attempt before retry number ``retry`` (1-based) to that retry."""
        exponent = min(max(retry - 1, 0), 62)
        return float(min(self.initial_wait * (2**exponent), self.max_wait))

    def gives_up(self, failed_attempts: int, queued_at: float, next_at: float) -> bool:
        """Bounce instead of retrying after ``failed_attempts`` (the first attempt and the retries so far): every
        retry is used up, or the next one would fall past the maximum time in queue."""
        return failed_attempts > self.max_retries or next_at - queued_at > self.max_time_in_queue

    def schedule(self) -> list[float]:
        """The times (seconds after queueing; the first attempt at 0) of every attempt of a message that always
        fails: after the last one it is bounced."""
        times, now, failed = [0.0], 0.0, 1
        while True:
            nxt = now + self.wait_before(failed)
            if self.gives_up(failed, 0.0, nxt):
                return times
            times.append(nxt)
            now, failed = nxt, failed + 1


# -- destination controls -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DestinationControl:
    """The rules for one destination: ``domain`` is ``example.com``, ``.example.com`` (subdomains) or ``default``."""

    domain: str = "default"
    tls: DestinationTLS = DestinationTLS.PREFERRED
    max_concurrency: int = 500  # concurrent connections to the domain (1-1000)
    max_messages_per_connection: int = 50  # (1-1000)
    max_recipients_per_hour: int | None = None  # None: no limit
    bounce_profile: str = "Default"


@dataclass(frozen=True)
class DestinationControls:
    default: DestinationControl = field(default_factory=DestinationControl)
    entries: Mapping[str, DestinationControl] = field(default_factory=dict)  # lower-case domain or .domain

    def lookup(self, domain: str) -> DestinationControl:
        """The exact domain's entry, else the nearest ``.parent`` entry (``.example.com`` covers
        ``a.b.example.com`` but not ``example.com`` itself), else the default."""
        name = domain.strip().rstrip(".").lower()
        if name in self.entries:
            return self.entries[name]
        labels = name.split(".")
        for i in range(1, len(labels)):
            entry = self.entries.get("." + ".".join(labels[i:]))
            if entry is not None:
                return entry
        return self.default
