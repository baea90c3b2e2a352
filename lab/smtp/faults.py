"""Fault policies: the ways a receiving MTA can break the STARTTLS and data rules, as data.

The lab's listener session runs with ``NO_FAULTS``. A session given another policy reintroduces the bugs it
names (bugs real MTAs have shipped), and keeps every other behaviour: the tests use such sessions to prove
verdicts can fail, and fail on the right cases. Each field names the rule of docs/rules.md it breaks.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FaultPolicy:
    #: §3.3: plaintext pipelined behind STARTTLS is kept and executed inside TLS (CVE-2011-0411).
    execute_injection: bool = False
    #: §2: these verbs are served before TLS under Required (the command gate is skipped for them).
    served_before_tls: frozenset[str] = frozenset()
    #: §3.4: the EHLO name and the envelope survive the handshake (as twisted.mail's ESMTP does).
    keep_state_across_tls: bool = False
    #: §3.2: the EHLO reply inside TLS lists STARTTLS too.
    advertise_starttls_in_tls: bool = False
    #: §3.9: any LF ends a line of message text, so ``<LF>.<CR><LF>`` ends the data (SMTP smuggling).
    bare_lf_ends_data: bool = False


NO_FAULTS = FaultPolicy()
