"""The enumerations of the appliance model (docs/rules.md §1-§2)."""

from __future__ import annotations

from enum import StrEnum


class TLSMode(StrEnum):
    """The "Use TLS" setting of a mail flow policy (Postfix: none / may / encrypt)."""

    NO = "no"
    PREFERRED = "preferred"
    REQUIRED = "required"


class Behaviour(StrEnum):
    """What a mail flow policy does with a connection."""

    ACCEPT = "accept"
    REJECT = "reject"  # banner 554, answer 503 until QUIT
    TCPREFUSE = "tcprefuse"  # close the TCP connection at once
    RELAY = "relay"  # accept, and relay beyond the RAT
    CONTINUE = "continue"  # keep matching further sender groups


class ListenerType(StrEnum):
    PUBLIC = "public"
    PRIVATE = "private"


class ClientCert(StrEnum):
    """What the client presented in the TLS handshake."""

    NONE = "none"
    VERIFIED = "verified"
    UNVERIFIED = "unverified"


#: Every spelling of a Use TLS setting, lower-cased: the lab's (and AsyncOS's, case aside) and Postfix's
#: smtpd_tls_security_level names. The one alias table: run, serve, profiles, appliance files and the pytest
#: plugin all read a policy through ``parse_tls_mode``.
TLS_MODE_NAMES: dict[str, TLSMode] = {
    "no": TLSMode.NO,
    "none": TLSMode.NO,
    "preferred": TLSMode.PREFERRED,
    "may": TLSMode.PREFERRED,
    "required": TLSMode.REQUIRED,
    "encrypt": TLSMode.REQUIRED,
}

#: How messages list the accepted spellings.
TLS_MODE_SPELLINGS = "no, preferred, required (Postfix: none, may, encrypt)"


def parse_tls_mode(text: str) -> TLSMode | None:
    """The mode a user's word names (``may`` -> PREFERRED, ``Required`` -> REQUIRED), or ``None``."""
    return TLS_MODE_NAMES.get(text.strip().lower())
