"""Mail-log evidence in any MTA's words: named events, a table of regexes per log dialect, and reading the
lines a target appended to its log file during one run.

Cases name events (``log.tls_failed: true``), never one MTA's wording; each dialect says which line shows the
event, or why it has none (then a case that needs the event is UNIMPLEMENTED against that dialect, never
FAILED). The ``smtplab`` dialect is the lab's own grammar (``lab.appliance.maillog.GRAMMAR``); ``postfix`` was
read off Postfix 3.7 with ``smtpd_tls_loglevel = 1`` (docs/conformance.md, "Mail-log evidence").
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.appliance.maillog import GRAMMAR
from lab.errors import HarnessError

#: Event -> (value type, what it means). ``bool``: seen at least once; ``int``: how many times.
EVENTS: dict[str, tuple[str, str]] = {
    "tls_success": ("bool", "a TLS session logged with its protocol and cipher"),
    "tls_failed": ("bool", "a failed TLS handshake"),
    "client_cert_verified": ("bool", "a client certificate that verified"),
    "client_cert_unverified": ("bool", "a client certificate that did not verify"),
    "injection_discarded": ("bool", "plaintext pipelined behind STARTTLS, discarded"),
    "demo_certificate": ("bool", "the demo certificate presented"),
    "message_queued": ("int", "a message accepted into the queue, logged with its sender and size"),
}


def _lab(name: str) -> re.Pattern[str]:
    return re.compile(GRAMMAR[name].pattern.removesuffix(r"\Z"))


#: Dialect -> event -> the regex of a line that shows it (``re.search``), or the reason no line does.
DIALECTS: dict[str, dict[str, re.Pattern[str] | str]] = {
    "smtplab": {
        "tls_success": _lab("tls_success"),
        "tls_failed": _lab("tls_failed"),
        "client_cert_verified": re.compile(r"ICID \d+ TLS client certificate verified"),
        "client_cert_unverified": re.compile(r"ICID \d+ TLS client certificate unverified"),
        "injection_discarded": _lab("injection_discarded"),
        "demo_certificate": _lab("demo_certificate"),
        "message_queued": re.compile(r"MID \d+ spooled "),
    },
    "postfix": {
        "tls_success": re.compile(
            r"postfix/smtpd\[\d+\]: (?:Anonymous|Untrusted|Trusted|Verified) TLS connection established from "
            r"\S+: TLSv[\d.]+ with cipher \S+"
        ),
        "tls_failed": re.compile(r"postfix/smtpd\[\d+\]: SSL_accept error from \S+"),
        "client_cert_verified": re.compile(r"postfix/smtpd\[\d+\]: (?:Trusted|Verified) TLS connection established"),
        "client_cert_unverified": re.compile(r"postfix/smtpd\[\d+\]: Untrusted TLS connection established"),
        "injection_discarded": "Postfix discards plaintext pipelined behind STARTTLS without logging it "
        "(Postfix 3.7, smtpd_tls_loglevel = 1)",
        "demo_certificate": "Postfix has no built-in demo certificate (no smtpd_tls_cert_file: no STARTTLS)",
        "message_queued": re.compile(r"postfix/qmgr\[\d+\]: \w+: from=<[^>]*>, size=\d+, nrcpt=\d+ \(queue active\)"),
    },
    "exim": {
        "tls_success": re.compile(r" <= \S+ .*\bX=TLS[\d.]+:\S+"),
        "tls_failed": re.compile(r"TLS error on connection from "),
        "client_cert_verified": re.compile(r" <= \S+ .*\bCV=yes\b"),
        "client_cert_unverified": re.compile(r" <= \S+ .*\bCV=no\b"),
        "injection_discarded": "Exim logs no line for plaintext it discards behind STARTTLS that the lab knows of",
        "demo_certificate": "Exim has no built-in demo certificate",
        "message_queued": re.compile(r" <= \S+ .*\bS=\d+"),
    },
}

LOG_DIALECTS: tuple[str, ...] = tuple(DIALECTS)
SETTLE_QUIET = 0.4  # seconds the log must stay unchanged before a run's lines are taken as complete
SETTLE_MAX = 4.0  # seconds a settle wait may take at most, whatever the target keeps writing
_POLL = 0.05


def observe(lines: Iterable[str], dialect: str) -> dict[str, Any]:
    """The ``log`` observation: every event of ``dialect`` that has a line, seen (bool) or counted (int)."""
    lines = list(lines)
    out: dict[str, Any] = {}
    for event, rule in DIALECTS[dialect].items():
        if isinstance(rule, str):
            continue
        count = sum(1 for line in lines if rule.search(line))
        out[event] = count if EVENTS[event][0] == "int" else count > 0
    return out


def unlogged(dialect: str, events: Iterable[str]) -> str | None:
    """Why ``dialect`` cannot show some of ``events`` (the UNIMPLEMENTED reason), or ``None``."""
    table = DIALECTS[dialect]
    gaps = [f"{EVENTS[e][1]} ({table[e]})" for e in dict.fromkeys(events) if isinstance(table.get(e), str)]
    if not gaps:
        return None
    return f"the target's {dialect} mail log has no line for: " + "; ".join(gaps)


@dataclass(frozen=True)
class MailLogFile:
    """A target's mail log (a declared fact): the file it appends to and the dialect of its lines."""

    path: Path
    dialect: str

    def _size(self) -> int:
        try:
            return os.stat(self.path).st_size
        except OSError as exc:
            raise HarnessError(f"cannot read the target's mail log {self.path}: {exc.strerror or exc}") from None

    def settle(self) -> int:
        """Wait (bounded by SETTLE_MAX) until the file stopped growing for SETTLE_QUIET seconds; its size then."""
        deadline = time.monotonic() + SETTLE_MAX
        size, quiet_since = self._size(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(_POLL)
            now = self._size()
            if now != size:
                size, quiet_since = now, time.monotonic()
            elif time.monotonic() - quiet_since >= SETTLE_QUIET:
                break
        return size

    def lines_since(self, offset: int) -> list[str]:
        """The lines appended after ``offset`` (from the start if the file was truncated or rotated)."""
        end = self.settle()
        start = offset if end >= offset else 0
        try:
            with open(self.path, "rb") as handle:
                handle.seek(start)
                data = handle.read(max(0, end - start))
        except OSError as exc:
            raise HarnessError(f"cannot read the target's mail log {self.path}: {exc.strerror or exc}") from None
        return data.decode("utf-8", "replace").splitlines()
