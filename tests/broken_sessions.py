"""Deliberately broken listeners: each fault policy reintroduces one STARTTLS bug real MTAs have shipped.

The acceptance tests run the catalogue against listeners whose sessions run one of these
(``RunOptions(faults=...)``) to prove that the verdicts can fail, and fail on the right cases. Each breaks
exactly one rule of docs/rules.md §2-3 and keeps every other behaviour of ``ServerSession``.
"""

from __future__ import annotations

from lab.smtp.faults import FaultPolicy

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
