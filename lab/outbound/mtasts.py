"""MTA-STS (RFC 8461) without I/O: the TXT record, the policy file, MX patterns, the per-MX decision, the cache.

The fetcher (``lab.outbound.policyserver``) brings the bytes; the delivery engine asks ``decide`` whether it may
hand a message to one MX given what TLS did there. Errors are values (``PolicyError`` with the RFC 8460 result
type), never exceptions: a broken policy is something the lab reports, not a crash.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

MAX_AGE_LIMIT = 31_557_600  # RFC 8461 3.2: max_age is at most one year
MAX_POLICY_BYTES = 64 * 1024  # RFC 8461 3.3 suggests bounding the body; 64 KiB is what common senders allow
POLICY_PATH = "/.well-known/mta-sts.txt"

_ID = re.compile(r"[A-Za-z0-9]{1,32}\Z")
_FIELD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}\Z")
_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_MX_PATTERN = re.compile(rf"(\*\.)?{_LABEL}(\.{_LABEL})*\.?\Z")


class Mode(StrEnum):
    ENFORCE = "enforce"
    TESTING = "testing"
    NONE = "none"


@dataclass(frozen=True)
class StsRecord:
    """The ``_mta-sts.<domain>`` TXT record: only its id matters (a new id means: fetch the policy again)."""

    id: str


@dataclass(frozen=True)
class Policy:
    """A parsed policy file; ``text`` is what TLS-RPT reports as policy-string (one entry per line)."""

    mode: Mode
    max_age: int
    mx: tuple[str, ...]
    text: str

    @property
    def lines(self) -> tuple[str, ...]:
        return tuple(line for line in self.text.replace("\r\n", "\n").split("\n") if line.strip())


@dataclass(frozen=True)
class PolicyError:
    """Why there is no usable policy: ``result_type`` is the RFC 8460 failure type, ``reason`` one line."""

    result_type: str  # sts-policy-fetch-error, sts-policy-invalid or sts-webpki-invalid
    reason: str


def parse_txt(records: Sequence[str]) -> StsRecord | PolicyError | None:
    """The ``_mta-sts`` TXT strings -> the record; None when no record starts ``v=STSv1`` (no policy published).

    RFC 8461 3.1: records not starting ``v=STSv1;`` are ignored; more than one that does means no usable record.
    """
    candidates = [r for r in records if r.replace(" ", "").startswith("v=STSv1;") or r.strip() == "v=STSv1"]
    if not candidates:
        return None
    if len(candidates) > 1:
        return PolicyError("sts-policy-invalid", f"{len(candidates)} _mta-sts TXT records")
    fields: dict[str, str] = {}
    for part in candidates[0].split(";"):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not _FIELD_NAME.match(key.strip()):
            return PolicyError("sts-policy-invalid", f"TXT record field {part[:40]!r} is not name=value")
        fields.setdefault(key.strip(), value.strip())
    record_id = fields.get("id")
    if record_id is None or not _ID.match(record_id):
        return PolicyError("sts-policy-invalid", f"TXT record id {record_id!r} is not 1-32 letters or digits")
    return StsRecord(record_id)


def parse_policy(text: str) -> Policy | PolicyError:
    """A policy file body -> ``Policy``, or ``PolicyError('sts-policy-invalid', ...)`` (RFC 8461 3.2).

    Lines are ``key: value`` ended by CRLF or LF; unknown keys are ignored; a repeated key other than ``mx``
    keeps its first value; version, mode and max_age are required, and ``mx`` too unless the mode is none.
    """
    fields: dict[str, str] = {}
    mx: list[str] = []
    for number, line in enumerate(text.replace("\r\n", "\n").split("\n"), start=1):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if not sep or not _FIELD_NAME.match(key):
            return PolicyError("sts-policy-invalid", f"line {number} is not 'key: value'")
        if key == "mx":
            if not _MX_PATTERN.match(value):
                return PolicyError("sts-policy-invalid", f"mx {value[:60]!r} is not a host name pattern")
            mx.append(value.rstrip(".").lower())
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        return PolicyError("sts-policy-invalid", f"version {fields.get('version')!r} is not 'STSv1'")
    try:
        mode = Mode(fields.get("mode", ""))
    except ValueError:
        return PolicyError("sts-policy-invalid", f"mode {fields.get('mode')!r} is not enforce, testing or none")
    age = fields.get("max_age", "")
    if not age.isdigit() or len(age) > 10 or int(age) > MAX_AGE_LIMIT:
        return PolicyError(
            "sts-policy-invalid", f"max_age {age[:20]!r} is not a number of seconds up to {MAX_AGE_LIMIT}"
        )
    if not mx and mode is not Mode.NONE:
        return PolicyError("sts-policy-invalid", f"mode {mode} without an mx line")
    return Policy(mode, int(age), tuple(mx), text)


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 4.1: case-insensitive, a trailing dot ignored; ``*.`` stands for exactly one leftmost label."""
    pattern, host = pattern.rstrip(".").lower(), host.rstrip(".").lower()
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label) and bool(dot) and rest == pattern[2:]
    return host == pattern


def mx_allowed(policy: Policy, host: str) -> bool:
    return any(mx_matches(pattern, host) for pattern in policy.mx)


@dataclass(frozen=True)
class TLSOutcome:
    """What one connection to an MX learned about TLS, in the order a sender checks it."""

    starttls_offered: bool
    handshake_ok: bool = True
    certificate_trusted: bool = True  # the chain leads to a trust anchor (in the lab: the lab CA)
    certificate_names_host: bool = True  # the certificate names the MX host (RFC 6125)
    certificate_expired: bool = False
    failure: str | None = None  # the handshake's own reason, when it failed


def tls_result_type(outcome: TLSOutcome) -> str | None:
    """The RFC 8460 result type of what went wrong with TLS on this connection, None when nothing did."""
    if not outcome.starttls_offered:
        return "starttls-not-supported"
    if not outcome.handshake_ok:
        return "validation-failure"
    if outcome.certificate_expired:
        return "certificate-expired"
    if not outcome.certificate_trusted:
        return "certificate-not-trusted"
    if not outcome.certificate_names_host:
        return "certificate-host-mismatch"
    return None


@dataclass(frozen=True)
class Decision:
    """May the message go to this MX? ``result_type`` (None: no failure) is what TLS-RPT counts."""

    deliver: bool
    result_type: str | None
    reason: str


def decide(policy: Policy | None, mx_host: str, outcome: TLSOutcome) -> Decision:
    """RFC 8461 5 for one candidate MX: enforce never delivers to an MX that fails the name match, the
    certificate check or STARTTLS; testing delivers anyway and reports; none (or no policy) only reports TLS."""
    problem = tls_result_type(outcome)
    reason = outcome.failure or (problem or "TLS verified")
    if policy is not None and policy.mode is not Mode.NONE and not mx_allowed(policy, mx_host):
        problem, reason = "validation-failure", f"mx {mx_host} matches no mx pattern of the policy"
    if problem is None:
        return Decision(True, None, reason)
    if policy is not None and policy.mode is Mode.ENFORCE:
        return Decision(False, problem, reason)
    return Decision(True, problem, reason)


@dataclass(frozen=True)
class _Cached:
    record_id: str
    policy: Policy
    expires: float


class PolicyCache:
    """Policies by domain, valid for max_age seconds of ``clock`` and as long as the TXT id does not change.

    RFC 8461 5.1: a policy still in its max_age stays in force when the TXT record disappears or the refetch
    fails, so an attacker who blocks DNS or HTTPS cannot downgrade a domain that once published enforce.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._entries: dict[str, _Cached] = {}

    def get(self, domain: str) -> _Cached | None:
        entry = self._entries.get(domain.lower())
        if entry is not None and entry.expires <= self._clock():
            del self._entries[domain.lower()]
            return None
        return entry

    def needs_fetch(self, domain: str, record: StsRecord | None) -> bool:
        """True when the TXT record names an id the cache does not hold (or nothing is cached)."""
        entry = self.get(domain)
        if record is None:
            return False
        return entry is None or entry.record_id != record.id

    def store(self, domain: str, record: StsRecord, policy: Policy) -> None:
        self._entries[domain.lower()] = _Cached(record.id, policy, self._clock() + policy.max_age)

    def policy(self, domain: str) -> Policy | None:
        entry = self.get(domain)
        return entry.policy if entry is not None else None


def resolve(
    cache: PolicyCache, domain: str, record: StsRecord | PolicyError | None, fetched: Policy | PolicyError | None
) -> Policy | PolicyError | None:
    """The policy in force for ``domain`` after one look at DNS (``record``) and, if it was needed, HTTPS
    (``fetched``): a fresh policy is cached; a failure falls back to a cached policy, else is reported."""
    if isinstance(record, StsRecord) and isinstance(fetched, Policy):
        cache.store(domain, record, fetched)
        return fetched
    cached = cache.policy(domain)
    if cached is not None:
        return cached
    if isinstance(record, PolicyError):
        return record
    return fetched if isinstance(fetched, PolicyError) else None
