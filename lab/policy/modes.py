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


class DeliveryTLS(StrEnum):
    """The TLS setting of a destination control: how a sender delivers to a domain (docs/rules.md §6).

    The first three share their values with ``TLSMode`` (the inbound setting of the same name); the two
    "Verify" settings also check the receiver's certificate.
    """

    NO = "no"
    PREFERRED = "preferred"
    REQUIRED = "required"
    PREFERRED_VERIFY = "preferred-verify"
    REQUIRED_VERIFY = "required-verify"


#: Every spelling of a destination control's TLS setting, lower-cased: AsyncOS's ("Preferred (Verify)") and
#: Postfix's smtp_tls_security_level (none, may, encrypt, verify, secure). ``secure`` is Required (Verify) with
#: the destination-domain name rule (docs/rules.md §6.6).
DELIVERY_TLS_NAMES: dict[str, DeliveryTLS] = {
    "no": DeliveryTLS.NO,
    "none": DeliveryTLS.NO,
    "preferred": DeliveryTLS.PREFERRED,
    "may": DeliveryTLS.PREFERRED,
    "required": DeliveryTLS.REQUIRED,
    "encrypt": DeliveryTLS.REQUIRED,
    "preferred-verify": DeliveryTLS.PREFERRED_VERIFY,
    "preferred (verify)": DeliveryTLS.PREFERRED_VERIFY,
    "required-verify": DeliveryTLS.REQUIRED_VERIFY,
    "required (verify)": DeliveryTLS.REQUIRED_VERIFY,
    "verify": DeliveryTLS.REQUIRED_VERIFY,
    "secure": DeliveryTLS.REQUIRED_VERIFY,
}

DELIVERY_TLS_SPELLINGS = (
    "no, preferred, required, preferred-verify, required-verify (Postfix: none, may, encrypt, verify, secure)"
)


def parse_delivery_tls(text: str) -> DeliveryTLS | None:
    """The destination control a user's word names (``encrypt`` -> REQUIRED, ``Required (Verify)``), or ``None``."""
    return DELIVERY_TLS_NAMES.get(" ".join(text.strip().lower().split()))


def run_policy(value: object) -> TLSMode | DeliveryTLS:
    """A result record's policy: a listener's ``TLSMode``, or a sender's ``DeliveryTLS`` for the Verify settings."""
    text = str(value)
    return TLSMode(text) if text in TLSMode._value2member_map_ else DeliveryTLS(text)


#: Report column order for every policy a record may hold.
POLICY_ORDER: tuple[str, ...] = tuple(DeliveryTLS)
