"""The command gate: may this command be served now, or what is the refusal? (docs/rules.md §2-§3)

``check`` answers ``None`` (serve it) or the ``Reply`` to send instead. It knows nothing of sequencing
(EHLO before MAIL, ...), only of what the TLS setting and the security state allow.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from lab.policy import replies
from lab.policy.modes import ClientCert, TLSMode
from lab.policy.replies import Reply

#: The commands served under Required before TLS is up (docs/rules.md §2).
SERVED_BEFORE_TLS = frozenset({"EHLO", "NOOP", "QUIT", "STARTTLS"})

#: The verbs the listener knows; anything else is "unknown".
KNOWN_VERBS = frozenset(
    {"EHLO", "HELO", "MAIL", "RCPT", "DATA", "RSET", "VRFY", "EXPN", "HELP", "NOOP", "QUIT", "STARTTLS", "AUTH"}
)


@dataclass(frozen=True)
class GateFacts:
    """What the gate needs to know about a session."""

    mode: TLSMode
    tls_active: bool = False
    verify_client: bool = False
    client_cert: ClientCert = ClientCert.NONE
    rejecting: bool = False  # the policy is REJECT: only QUIT is served


def lacks_security(facts: GateFacts) -> bool:
    """After TLS, does client-certificate verification refuse this session? (RFC 3207 4.1)"""
    if not (facts.tls_active and facts.verify_client):
        return False
    if facts.mode is TLSMode.REQUIRED:
        return facts.client_cert is not ClientCert.VERIFIED
    return facts.client_cert is ClientCert.UNVERIFIED


def check(verb: str, has_argument: bool, facts: GateFacts) -> Reply | None:
    """``None`` when ``verb`` may be served now, else the refusal to send."""
    verb = verb.upper()
    if verb == "QUIT":
        return None
    if facts.rejecting:
        return replies.BAD_SEQUENCE
    if lacks_security(facts):
        return replies.LACK_OF_SECURITY
    if verb == "STARTTLS":
        if facts.mode is TLSMode.NO:
            return replies.STARTTLS_NOT_IMPLEMENTED
        if has_argument:
            return replies.STARTTLS_NO_PARAMETERS
        if facts.tls_active:
            return replies.TLS_ALREADY_ACTIVE
        return None
    if facts.mode is TLSMode.REQUIRED and not facts.tls_active and verb not in SERVED_BEFORE_TLS:
        return replies.MUST_STARTTLS
    return None


def advertises_starttls(facts: GateFacts) -> bool:
    """EHLO lists STARTTLS under Preferred and Required, never inside TLS (RFC 3207 4.2)."""
    return facts.mode is not TLSMode.NO and not facts.tls_active and not facts.rejecting


def sender_requires_tls(sender: str, mandatory: Iterable[str]) -> bool:
    """Is ``sender`` on a Preferred policy's list of senders for whom TLS is mandatory?

    Entries are full addresses (``a@example.com``) or domains (``example.com`` / ``@example.com``).
    """
    address = sender.strip().strip("<>").lower()
    domain = address.rpartition("@")[2]
    for entry in mandatory:
        entry = entry.strip().lower()
        if "@" in entry.lstrip("@"):
            if address == entry:
                return True
        elif domain and domain == entry.lstrip("@"):
            return True
    return False


def check_sender(sender: str, mandatory: Iterable[str], facts: GateFacts) -> Reply | None:
    """The Preferred policy's mandatory-TLS sender list, applied at MAIL FROM."""
    if facts.mode is TLSMode.PREFERRED and not facts.tls_active and sender_requires_tls(sender, mandatory):
        return replies.MUST_STARTTLS
    return None
