"""Client-side fallback rules: after a STARTTLS problem, may a client go on in plaintext? (docs/rules.md §4)"""

from __future__ import annotations

from enum import StrEnum


class ClientTLS(StrEnum):
    """The client behaviours, named after what real MTAs and swaks do."""

    SKIP = "skip"  # never sends STARTTLS
    PREFER = "prefer"  # opportunistic (Postfix may, Exim)
    PREFER_STRICT = "prefer-strict"  # swaks --tls-optional-strict
    REQUIRE = "require"  # Postfix encrypt, swaks --tls
    REQUIRE_VERIFY = "require-verify"  # and verify the server certificate


class Problem(StrEnum):
    """Where TLS did not come up."""

    NOT_ADVERTISED = "not-advertised"  # EHLO had no STARTTLS
    REFUSED = "refused"  # STARTTLS answered with something else than 220 (e.g. 454)
    HANDSHAKE_FAILED = "handshake-failed"  # after 220, the handshake failed
    VERIFY_FAILED = "verify-failed"  # the handshake worked, the certificate did not verify


class Next(StrEnum):
    """What the client does next."""

    PLAINTEXT = "plaintext"  # go on in plaintext on this connection
    RETRY_PLAINTEXT = "retry-plaintext"  # give up this connection, deliver again in plaintext on a new one
    ABORT = "abort"  # QUIT, nothing is sent
    IGNORE = "ignore"  # the problem does not concern this client (it does not verify)


_TABLE: dict[ClientTLS, dict[Problem, Next]] = {
    ClientTLS.SKIP: {p: Next.PLAINTEXT for p in Problem},
    ClientTLS.PREFER: {
        Problem.NOT_ADVERTISED: Next.PLAINTEXT,
        Problem.REFUSED: Next.PLAINTEXT,
        Problem.HANDSHAKE_FAILED: Next.RETRY_PLAINTEXT,
        Problem.VERIFY_FAILED: Next.IGNORE,
    },
    ClientTLS.PREFER_STRICT: {
        Problem.NOT_ADVERTISED: Next.PLAINTEXT,
        Problem.REFUSED: Next.ABORT,
        Problem.HANDSHAKE_FAILED: Next.ABORT,
        Problem.VERIFY_FAILED: Next.IGNORE,
    },
    ClientTLS.REQUIRE: {
        Problem.NOT_ADVERTISED: Next.ABORT,
        Problem.REFUSED: Next.ABORT,
        Problem.HANDSHAKE_FAILED: Next.ABORT,
        Problem.VERIFY_FAILED: Next.IGNORE,
    },
    ClientTLS.REQUIRE_VERIFY: {p: Next.ABORT for p in Problem},
}


def after(behaviour: ClientTLS, problem: Problem) -> Next:
    """The one rule table every simulated client follows."""
    return _TABLE[behaviour][problem]


def attempts_starttls(behaviour: ClientTLS, advertised: bool) -> bool:
    """Does this client send STARTTLS given what EHLO said?"""
    return behaviour is not ClientTLS.SKIP and advertised
