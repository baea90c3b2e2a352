"""The enumerations of the appliance model (SPEC.md 1-2)."""

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
