"""System alerts: one mail-log line, and one message to every alert recipient who takes the alert's class and
severity, delivered into a local mailbox (a Maildir per recipient under ``<state>/alerts/``) the lab can show.

The appliance mails alerts to its administrators; the lab has no administrators' mail server, so the mailbox
stands in for it (``ls <state>/alerts/postmaster@example.com/new``).
"""

from __future__ import annotations

import email.utils
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lab.appliance.maillog import MailLog
from lab.appliance.model import Appliance
from lab.appliance.spool import Spool, SpoolError


@dataclass(frozen=True)
class SentAlert:
    severity: str
    alert_class: str
    subject: str
    text: str
    mailed: tuple[Path, ...]  # the message files, one per recipient


class Alerts:
    def __init__(self, appliance: Appliance, root: Path, maillog: MailLog, clock: Callable[[], float]) -> None:
        self.appliance = appliance
        self.mailboxes = Spool(root)
        self.maillog = maillog
        self.clock = clock
        self.sent: list[SentAlert] = []

    def send(self, severity: str, alert_class: str, subject: str, text: str) -> SentAlert:
        """Log the alert and mail it to its recipients (a mailbox that cannot be written is logged, not fatal)."""
        self.maillog.alert(severity, alert_class, text)
        mailed: list[Path] = []
        for address in self.appliance.outbound.alert_recipients_for(alert_class, severity):
            box = self.mailboxes.for_listener(address)
            try:
                name = box.deliver(self._message(address, severity, alert_class, subject, text))
            except SpoolError as exc:
                self.maillog.alert("critical", "system", f"alert to {address} not stored: {exc}")
                continue
            mailed.append(box.path / "new" / name)
        alert = SentAlert(severity.capitalize(), alert_class.capitalize(), subject, text, tuple(mailed))
        self.sent.append(alert)
        return alert

    def _message(self, to: str, severity: str, alert_class: str, subject: str, text: str) -> bytes:
        host = self.appliance.hostname
        now = self.clock()
        lines = [
            f"From: Appliance Alerts <alert@{host}>",
            f"To: <{to}>",
            f"Subject: {severity.capitalize()} <{alert_class.capitalize()}> {host}: {subject}",
            f"Date: {email.utils.formatdate(now, usegmt=True)}",
            "Auto-Submitted: auto-generated",
            "MIME-Version: 1.0",
            "Content-Type: text/plain; charset=us-ascii",
            "",
            f"The {severity.capitalize()} message is:",
            "",
            text,
            "",
            f"Version: smtplab appliance {host}",
            f"Timestamp: {email.utils.formatdate(now, usegmt=True)}",
            "",
        ]
        return "\r\n".join(lines).encode("ascii", "replace")
