"""TLS-RPT from the delivery engine (RFC 8460): each UTC day's report per policy domain, written and mailed.

At the end of each UTC day on the run's clock (``start``), or when asked (``send_reports``), every recipient
domain that had a TLS session that day and publishes ``_smtp._tls`` with ``mailto:`` addresses gets the day's
report, built from the engine's ``DeliveryAttempt``s (``lab.outbound.tlsrpt.build_report``), written gzipped
under ``<state>/tlsrpt/`` with the RFC's file name, and queued to those addresses like any message (the null
reverse-path: a report that cannot be delivered gets no DSN). The day's timer is armed only by deliveries of
other mail, so a lab whose only traffic is the reports themselves goes idle.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from twisted.internet.interfaces import IDelayedCall

from lab.outbound.attempt import DeliveryAttempt
from lab.outbound.engine import DeliveryEngine
from lab.outbound.tlsrpt import Reporter, build_report, parse_tlsrpt_txt, report_domains, report_message, write_report

DAY = 86400.0


@dataclass(frozen=True)
class SentReport:
    """One day's report of one policy domain: where it was written, and the MID that carries it (None: the
    domain's ``rua`` has no ``mailto:`` address, so it was only written)."""

    domain: str
    day: dt.date
    path: Path
    mid: int | None
    rua: tuple[str, ...]


class TlsReports:
    """The appliance's TLS-RPT reporter over ``engine``; ``txt(name)`` answers the virtual DNS's TXT records."""

    def __init__(
        self,
        engine: DeliveryEngine,
        *,
        txt: Callable[[str], Sequence[str]],
        directory: Path,
        reporter: Reporter | None = None,
    ) -> None:
        hostname = engine.appliance.hostname
        self.engine, self.txt, self.directory = engine, txt, directory
        self.reporter = reporter or Reporter("smtplab appliance", hostname, f"mailto:postmaster@{hostname}")
        self.sent: list[SentReport] = []
        self._report_mids: set[int] = set()
        self._timer: IDelayedCall | None = None
        self._running = False

    def start(self) -> None:
        """Send each day's reports at the next UTC midnight after a delivery of that day."""
        self._running = True
        self.engine.attempt_listeners.append(self._attempted)

    def stop(self) -> None:
        self._running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _attempted(self, attempt: DeliveryAttempt) -> None:
        if not self._running or self._timer is not None or set(attempt.mids) <= self._report_mids:
            return
        now = self.engine.clock.seconds()
        midnight = (now // DAY + 1) * DAY
        self._timer = self.engine.clock.callLater(midnight - now, self._midnight, _utc_date(now))

    def _midnight(self, day: dt.date) -> None:
        self._timer = None
        self.send_reports(day)

    def send_reports(self, day: dt.date) -> list[SentReport]:
        """The reports of the UTC ``day`` for every policy domain that had a TLS session then and publishes
        TLS-RPT: written under ``directory`` and queued to its ``mailto:`` addresses."""
        out = []
        now = self.engine.clock.seconds()
        for domain in report_domains(self.engine.attempts, day):
            record = parse_tlsrpt_txt(self.txt(f"_smtp._tls.{domain}"))
            if record is None:
                continue
            report = build_report(self.engine.attempts, domain, day, self.reporter)
            if report is None:
                continue
            path = write_report(report, self.reporter, domain, self.directory)
            mid = None
            if record.mailto:
                moment = dt.datetime.fromtimestamp(now, dt.UTC)
                data = report_message(report, self.reporter, domain, record.mailto, moment).as_bytes()
                mid = self.engine.maillog.next_mid()
                self._report_mids.add(mid)
                self.engine.maillog.tlsrpt_report(domain, day.isoformat(), path.name, mid)
                self.engine.maillog.mid_ready(mid, len(data))
                self.engine.enqueue(data, mid=mid, sender="", recipients=list(enumerate(record.mailto)))
            else:
                self.engine.maillog.tlsrpt_report(domain, day.isoformat(), path.name, None)
            out.append(SentReport(domain, day, path, mid, record.rua))
        self.sent.extend(out)
        return out


def _utc_date(epoch: float) -> dt.date:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).date()
