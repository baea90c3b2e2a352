"""Deliberately broken listeners: each fault policy reintroduces one STARTTLS bug real MTAs have shipped.

The acceptance tests run the catalogue against listeners whose sessions run one of these
(``RunOptions(faults=...)``) to prove that the verdicts can fail, and fail on the right cases. Each breaks
exactly one rule of docs/rules.md §2-3 and keeps every other behaviour of ``ServerSession``. ``PROBE_FAULTS``
are the listeners ``smtplab probe`` is proven against (tests/test_probe.py), one for each of its checks.
"""

from __future__ import annotations

from lab.smtp.core.events import Reply
from lab.smtp.faults import STARTTLS_454, FaultPolicy

#: CVE-2011-0411: plaintext pipelined behind STARTTLS survives the handshake and is executed inside TLS, as the
#: vulnerable Postfix, Exim and qmail versions did (breaks §3.3).
INJECTION_EXECUTING = FaultPolicy(execute_injection=True)

#: Serves MAIL before TLS under Required: the command gate is skipped for MAIL only (breaks §2).
GATE_BYPASS = FaultPolicy(served_before_tls=frozenset({"MAIL"}))

#: Keeps the EHLO name and the envelope across the handshake, as twisted.mail's ESMTP does: what the client
#: said in plaintext still counts inside TLS (breaks §3.4).
STATE_KEEPING = FaultPolicy(keep_state_across_tls=True)

#: Lists STARTTLS in its EHLO reply inside TLS too (breaks §3.2, RFC 3207 4.2).
STARTTLS_ADVERTISED_INSIDE_TLS = FaultPolicy(advertise_starttls_in_tls=True)

#: Takes ``<LF>.<CR><LF>`` for the end of data: in the message text, any LF ends a line, as Postfix before
#: smtpd_forbid_bare_newline, Sendmail before 8.18 and Exim before 4.97.1 did (SMTP smuggling, CVE-2023-51764,
#: -51765, -51766): the forged transaction behind the false end is executed (breaks §3.9).
BARE_LF_END_OF_DATA = FaultPolicy(bare_lf_ends_data=True)


# -- the probe's deviations (tests/test_probe.py): one broken listener for each check of lab.conformance.probe

OK_TEXT = Reply(250, "2.0.0", "OK")

PROBE_FAULTS: dict[str, FaultPolicy] = {
    "helo-before-starttls": FaultPolicy(served_before_tls=frozenset({"HELO"})),
    "starttls-injection": INJECTION_EXECUTING,
    "starttls-pipelined-plaintext": FaultPolicy(answer_behind_starttls=OK_TEXT),
    "state-across-tls": FaultPolicy(keep_greeting_across_tls=True),
    "mail-without-ehlo": FaultPolicy(mail_without_greeting=True),
    "envelope-across-tls": FaultPolicy(keep_envelope_across_tls=True),
    "starttls-twice": FaultPolicy(starttls_in_tls=Reply(220, "2.0.0", "Ready to start TLS again")),
    "starttls-in-tls-ehlo": STARTTLS_ADVERTISED_INSIDE_TLS,
    "starttls-argument": FaultPolicy(starttls_takes_argument=True),
    "long-command-line": FaultPolicy(long_command_lines=True),
    "nul-in-command": FaultPolicy(nul_in_commands=True),
    "starttls-refused": STARTTLS_454,
    "starttls-unadvertised": FaultPolicy(serve_unadvertised_starttls=True),
    #: not a deviation: a listener that requires a client certificate closes on an unverified one (as Postfix's
    #: smtpd_tls_req_ccert), where the lab's refuses each command
    "close-unverified": FaultPolicy(close_unverified=Reply(421, "4.7.1", "Client certificate required")),
}
