"""The named client behaviours (docs/rules.md §4) as step lists: what swaks, Postfix and Exim do, and how they fail.

Every behaviour is data built from ``lab.smtp.steps``; the TLS decisions all go through one ``tls_policy`` step,
so the only rules are the ones in ``lab.policy.fallback``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from lab.errors import BadInput
from lab.policy.fallback import ClientTLS
from lab.smtp.steps import Ehlo, Helo, Mail, Quit, Send, StartTLS, Step, TLSOptions, TLSPolicy

#: name -> one line for listings (``smtplab behaviours``, reports).
BEHAVIOURS: dict[str, str] = {
    "skip": "never sends STARTTLS (a legacy MTA; swaks without --tls)",
    "prefer": "STARTTLS when advertised, else plaintext; after 454 goes on in plaintext, after a failed handshake "
    "retries in plaintext on a new connection (Postfix may, Exim)",
    "prefer-strict": "plaintext only when STARTTLS is not advertised; gives up if it is and fails "
    "(swaks --tls-optional-strict)",
    "require": "gives up with QUIT when STARTTLS is missing or fails (Postfix encrypt, swaks --tls)",
    "require-verify": "as require, and quits unless the server certificate verifies for the host name "
    "(Postfix verify/secure)",
    "fail-plaintext-after-220": "gets the 220 to STARTTLS, then goes on in plaintext instead of a ClientHello",
    "fail-old-tls": "offers only TLS 1.0/1.1 (with @SECLEVEL=0, as OpenSSL 3 needs)",
    "fail-no-shared-cipher": "TLS 1.2 at most, with only CAMELLIA/ARIA ciphers, which servers rarely enable",
    "fail-abort-handshake": "sends the ClientHello, then closes the connection",
    "fail-reject-demo-cert": "requires a verified server certificate; the demo certificate never verifies",
    "fail-no-client-cert": "requires TLS and presents no client certificate",
    "fail-untrusted-client-cert": "requires TLS and presents a client certificate from a CA nobody trusts",
    "helo-instead-of-ehlo": "HELO, so it never learns of STARTTLS, then mail in plaintext",
    "mail-before-starttls": "EHLO, MAIL FROM before STARTTLS, then STARTTLS, EHLO and the delivery",
    "starttls-with-argument": "sends STARTTLS with an argument (RFC 3207: 501), then mail",
    "starttls-twice": "STARTTLS, EHLO, and STARTTLS again inside TLS (RFC 3207: refused), then mail",
    "pipeline-behind-starttls": "writes MAIL FROM in the same write behind STARTTLS (command injection)",
    "skip-ehlo-after-tls": "goes straight to MAIL after the handshake, without the new EHLO",
}

#: The fail variants' TLS options; all of them are otherwise ``require`` (or ``require-verify``).
OLD_TLS = TLSOptions(min_version="1.0", max_version="1.1", ciphers="DEFAULT:@SECLEVEL=0")
NO_SHARED_CIPHER = TLSOptions(max_version="1.2", ciphers="eNULL:@SECLEVEL=0")  # no real server enables NULL ciphers


def behaviour_steps(
    name: str,
    *,
    ehlo: str,
    mail_from: str,
    rcpt_to: str | Sequence[str],
    body_marker: str | None = None,
) -> list[Step]:
    """The steps of behaviour ``name``: a TLS decision, one delivery, QUIT."""
    try:
        build = _BUILDERS[name]
    except KeyError:
        raise BadInput(
            f"unknown client behaviour {name!r} (known: {', '.join(BEHAVIOURS)})", field="behaviour"
        ) from None
    recipients = (rcpt_to,) if isinstance(rcpt_to, str) else tuple(rcpt_to)
    mail = Mail(mail_from, recipients, marker=body_marker)
    return build(ehlo, mail)


def _policy(behaviour: ClientTLS, tls: TLSOptions | None = None) -> Callable[[str, Mail], list[Step]]:
    def build(ehlo: str, mail: Mail) -> list[Step]:
        verify = behaviour is ClientTLS.REQUIRE_VERIFY
        options = tls or TLSOptions(verify=verify)
        return [TLSPolicy(behaviour, ehlo=ehlo, tls=options), mail, Quit()]

    return build


def _helo_instead_of_ehlo(ehlo: str, mail: Mail) -> list[Step]:
    return [Helo(ehlo), mail, Quit()]


def _mail_before_starttls(ehlo: str, mail: Mail) -> list[Step]:
    early = Send(f"MAIL FROM:<{mail.mail_from}>", label="MAIL-before-STARTTLS")
    return [Ehlo(ehlo), early, StartTLS(), Ehlo(ehlo), mail, Quit()]


def _starttls_with_argument(ehlo: str, mail: Mail) -> list[Step]:
    return [Ehlo(ehlo), StartTLS(argument="NOW"), mail, Quit()]


def _starttls_twice(ehlo: str, mail: Mail) -> list[Step]:
    return [Ehlo(ehlo), StartTLS(), Ehlo(ehlo), StartTLS(), mail, Quit()]


def _pipeline_behind_starttls(ehlo: str, mail: Mail) -> list[Step]:
    inject = f"MAIL FROM:<{mail.mail_from}>\r\n".encode()
    return [Ehlo(ehlo), StartTLS(inject=inject), Ehlo(ehlo), mail, Quit()]


def _skip_ehlo_after_tls(ehlo: str, mail: Mail) -> list[Step]:
    return [Ehlo(ehlo), StartTLS(), mail, Quit()]


_BUILDERS: dict[str, Callable[[str, Mail], list[Step]]] = {
    "skip": _policy(ClientTLS.SKIP),
    "prefer": _policy(ClientTLS.PREFER),
    "prefer-strict": _policy(ClientTLS.PREFER_STRICT),
    "require": _policy(ClientTLS.REQUIRE),
    "require-verify": _policy(ClientTLS.REQUIRE_VERIFY),
    "fail-plaintext-after-220": _policy(ClientTLS.REQUIRE, TLSOptions(plaintext_after_220=True)),
    "fail-old-tls": _policy(ClientTLS.REQUIRE, OLD_TLS),
    "fail-no-shared-cipher": _policy(ClientTLS.REQUIRE, NO_SHARED_CIPHER),
    "fail-abort-handshake": _policy(ClientTLS.REQUIRE, TLSOptions(abort_mid_handshake=True)),
    "fail-reject-demo-cert": _policy(ClientTLS.REQUIRE_VERIFY, TLSOptions(verify=True)),
    "fail-no-client-cert": _policy(ClientTLS.REQUIRE, TLSOptions(client_cert="none")),
    "fail-untrusted-client-cert": _policy(ClientTLS.REQUIRE, TLSOptions(client_cert="untrusted")),
    "helo-instead-of-ehlo": _helo_instead_of_ehlo,
    "mail-before-starttls": _mail_before_starttls,
    "starttls-with-argument": _starttls_with_argument,
    "starttls-twice": _starttls_twice,
    "pipeline-behind-starttls": _pipeline_behind_starttls,
    "skip-ehlo-after-tls": _skip_ehlo_after_tls,
}
assert set(_BUILDERS) == set(BEHAVIOURS)
