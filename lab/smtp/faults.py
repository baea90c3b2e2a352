"""Fault policies: the ways a receiving MTA can break the STARTTLS and data rules, as data.

The lab's listener session runs with ``NO_FAULTS``. A session given another policy reintroduces the bugs it
names (bugs real MTAs have shipped, or what an attacker on the path makes a server look like), and keeps every
other behaviour: the tests use such sessions to prove verdicts can fail, and fail on the right cases, and the
remote MTA (``lab.smtp.remote_mta``) is a session with one of them. Each field names the rule of
docs/rules.md (or of RFC 3207) it breaks.
"""

from __future__ import annotations

from dataclasses import dataclass

from lab.smtp.core.events import Reply

#: A fatal TLS alert, handshake_failure(40): what a server with nothing in common with the ClientHello sends.
HANDSHAKE_FAILURE_ALERT = b"\x15\x03\x03\x00\x02\x02\x28"
#: Plaintext where a TLS ServerHello belongs.
GARBAGE = b"500 this is not a TLS ServerHello\r\n"
#: Sent in the same write as the 220 to STARTTLS by ``RESPONSE_INJECTION``.
INJECTED_REPLY = b"250 2.0.0 injected\r\n"


@dataclass(frozen=True)
class FaultPolicy:
    #: §3.3: plaintext pipelined behind STARTTLS is kept and executed inside TLS (CVE-2011-0411).
    execute_injection: bool = False
    #: §2: these verbs are served before TLS under Required (the command gate is skipped for them).
    served_before_tls: frozenset[str] = frozenset()
    #: §3.4: the EHLO name and the envelope survive the handshake (as twisted.mail's ESMTP does).
    keep_state_across_tls: bool = False
    #: §3.4: the EHLO name survives the handshake (MAIL inside TLS is served without a new EHLO).
    keep_greeting_across_tls: bool = False
    #: §3.4: the envelope survives the handshake and the EHLO after it (RFC 5321 4.1.4: EHLO resets it).
    keep_envelope_across_tls: bool = False
    #: RFC 5321 4.1.4: MAIL is served without any EHLO or HELO first.
    mail_without_greeting: bool = False
    #: §3.2: the EHLO reply inside TLS lists STARTTLS too.
    advertise_starttls_in_tls: bool = False
    #: §3.6: command lines longer than 512 octets are executed.
    long_command_lines: bool = False
    #: §3.6: NUL bytes in a command line are dropped and the line executed.
    nul_in_commands: bool = False
    #: §3.9: any LF ends a line of message text, so ``<LF>.<CR><LF>`` ends the data (SMTP smuggling).
    bare_lf_ends_data: bool = False
    #: RFC 3207 4: STARTTLS is listed, then refused with this reply (454: "TLS not available").
    refuse_starttls: Reply | None = None
    #: RFC 3207 4: after the 220 to STARTTLS, the client's ClientHello is never answered and the connection stays
    #: open (a handshake that stalls: the client's own timeout has to end it).
    stall_handshake: bool = False
    #: RFC 3207 4: STARTTLS is served though not listed (the policy offers no TLS).
    serve_unadvertised_starttls: bool = False
    #: RFC 3207 4: STARTTLS with an argument is served (instead of 501).
    starttls_takes_argument: bool = False
    #: RFC 3207 4.2: a STARTTLS inside TLS is answered with this reply (instead of 503), and nothing else happens.
    starttls_in_tls: Reply | None = None
    #: §3.3: each line pipelined behind STARTTLS is answered with this reply in plaintext, in the 220's write
    #: (a server that runs its input buffer before the handshake), and then dropped.
    answer_behind_starttls: Reply | None = None
    #: RFC 3207 4.2: these bytes follow the 220 to STARTTLS in the same write, as if the server had answered
    #: commands not yet sent (response injection by an attacker in the middle).
    behind_starttls_220: bytes = b""
    #: RFC 3207 4: after the 220, the client's first TLS record (its ClientHello) is answered with these bytes
    #: and the connection closed: no handshake (``GARBAGE``, ``HANDSHAKE_FAILURE_ALERT``).
    answer_client_hello: bytes | None = None
    #: docs/rules.md §3.5: an EHLO inside TLS from a client without a verified certificate gets this reply and
    #: the connection is closed (Postfix's smtpd_tls_req_ccert), instead of a refusal of each command.
    close_unverified: Reply | None = None
    #: RFC 5321 3.8: a session greeted (EHLO/HELO) with one of these names ignores the server's stop (no 421):
    #: only the stop's grace period ends it.
    ignore_shutdown_from: frozenset[str] = frozenset()


NO_FAULTS = FaultPolicy()

# -- the remote MTA's STARTTLS misbehaviours (``lab.smtp.remote_mta``; "absent" is a server without TLS, no fault)

STARTTLS_454 = FaultPolicy(refuse_starttls=Reply(454, "4.7.0", "TLS not available due to local problem"))
RESPONSE_INJECTION = FaultPolicy(behind_starttls_220=INJECTED_REPLY)
GARBAGE_AFTER_220 = FaultPolicy(answer_client_hello=GARBAGE)
HANDSHAKE_FAIL = FaultPolicy(answer_client_hello=HANDSHAKE_FAILURE_ALERT)
STARTTLS_421 = FaultPolicy(refuse_starttls=Reply(421, "4.7.0", "TLS not available, closing connection"))
STARTTLS_554 = FaultPolicy(refuse_starttls=Reply(554, "5.7.0", "TLS not available"))
STALL_HANDSHAKE = FaultPolicy(stall_handshake=True)
