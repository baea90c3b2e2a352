"""The delivery engine: takes due items from the durable queue and delivers them (docs/outbound.md).

For each recipient domain: the destination control (``lab.policy.destinations``), the MX hosts from the virtual
DNS in preference order (the next MX when one cannot be reached or will not take the message under the TLS
rule), at most ``max_messages_per_connection`` messages per connection and ``max_concurrency`` connections at
once. Each connection is one DCID in the mail log and one ``DeliveryAttempt``. A temporary failure defers the
recipient to the bounce profile's next retry on the carrier's clock; a permanent one, or the end of the time in
queue, bounces it with a DSN to the sender. A delivery that TLS was required for and could not get raises a
Warning system alert naming the domain. Domains the appliance accepts mail for itself (its public listeners'
RAT) are delivered into that listener's spool, without SMTP.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import ClientFactory

from lab.appliance.maillog import MailLog
from lab.appliance.model import Appliance
from lab.appliance.spool import Spool, SpoolError
from lab.net.topology import MXHost
from lab.outbound.alerts import Alerts
from lab.outbound.attempt import DeliveryAttempt, Outcome
from lab.outbound.client import Answer, ConnectionReport, DeliveryInterpreter, Envelope
from lab.outbound.dsn import FailedRecipient, build_dsn
from lab.outbound.mtasts import Mode
from lab.outbound.published import AppliedPolicy, no_published_policy
from lab.outbound.queue import OutboundQueue, QueuedRecipient, QueueItem, QueueState
from lab.policy.destinations import DestinationControl, Next, result_type
from lab.smtp.client import ScriptedClient
from lab.smtp.transcript import Entry
from lab.tls.certs import CertKey
from lab.tls.tlsctx import ClientTLSFactory, KeyLog

if TYPE_CHECKING:
    from lab.outbound.reports import TlsReports

#: (source IP, destination IP, port, client factory) -> Deferred: the carrier's connect, with its middleboxes.
Connect = Callable[[str, str, int, ClientFactory], "Deferred[Any]"]
#: recipient domain -> the hosts to try, in order (``lab.net.topology.Topology.mx``).
Resolve = Callable[[str], Sequence[MXHost]]
#: (recipient domain, its destination control) -> the rules to apply (``lab.outbound.published.AppliedPolicy``),
#: at once or as an awaitable: where a published policy (MTA-STS) tightens a domain's control before its round.
PolicySource = Callable[[str, DestinationControl], AppliedPolicy | Awaitable[AppliedPolicy]]


TLS_REQUIRED_STATUS = "4.7.10"  # RFC 3463 / RFC 5248: encryption needed
EXPIRED_STATUS = "5.4.7"  # RFC 3463: delivery time expired
NO_ROUTE_STATUS = "5.1.2"  # RFC 3463: bad destination system address (no MX, no address)
HOUR = 3600.0
MIN_WAIT = 0.001  # the shortest wait before the next round: a round never follows itself within one turn


@dataclass
class DomainCounters:
    """Per recipient domain: recipients delivered / deferred (each deferral) / bounced; connections and TLS."""

    delivered: int = 0
    deferred: int = 0
    bounced: int = 0
    connections: int = 0
    tls_success: int = 0
    tls_failure: int = 0


class DeliveryEngine:
    def __init__(
        self,
        appliance: Appliance,
        queue: OutboundQueue,
        *,
        clock: IReactorTime,
        maillog: MailLog,
        resolve: Resolve,
        connect: Connect,
        spool: Spool,
        alerts: Alerts,
        trust_pems: Sequence[bytes] = (),
        client_cert: CertKey | None = None,
        keylog: KeyLog | None = None,
        port: int = 25,
        reply_timeout: float = 30.0,
        policy_source: PolicySource = no_published_policy,
    ) -> None:
        self.appliance = appliance
        self.policy_source = policy_source
        self.queue = queue
        self.clock = clock
        self.maillog = maillog
        self.resolve = resolve
        self.connect = connect
        self.spool = spool
        self.alerts = alerts
        self.trust_pems = tuple(trust_pems)
        self.client_cert = client_cert
        self.port = port
        self.reply_timeout = reply_timeout
        certs = {"lab": client_cert} if client_cert is not None else {}
        self.tls_factory = ClientTLSFactory(
            trust_pems=self.trust_pems, certs=lambda kind: certs.get(kind), keylog=keylog, cache=True
        )
        self.attempts: list[DeliveryAttempt] = []  # every delivery connection, in order (TLS-RPT reads these)
        self.attempt_listeners: list[Callable[[DeliveryAttempt], None]] = []  # told of each one (lab.outbound.reports)
        self.reports: TlsReports | None = None  # the TLS-RPT reporter over these attempts (attach_outbound)
        self.counters: dict[str, DomainCounters] = {}
        self.entries: dict[int, list[Entry]] = {}  # DCID -> the client's transcript of that connection
        self._recent: dict[str, deque[float]] = {}  # domain -> times recipients were delivered (rate limit)
        self._timer: IDelayedCall | None = None
        self._running = False
        self._again = False
        self._waiters: list[Deferred[None]] = []
        self.stopped = False

    # -- feeding the queue

    def enqueue(self, data: bytes, *, mid: int, sender: str, recipients: Sequence[tuple[int, str]]) -> list[QueueItem]:
        """Queue a message durably (SpoolError if it cannot be) and have it delivered soon."""
        items = self.queue.enqueue(data, mid=mid, sender=sender, recipients=recipients, now=self.clock.seconds())
        self.kick()
        return items

    def kick(self) -> None:
        """Look at the queue now (after the current turn)."""
        if self.stopped:
            return
        self._schedule(0.0)

    def settled(self) -> Deferred[None]:
        """Fires once the queue is empty and no delivery is under way (every item delivered or bounced)."""
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        self._check_settled()
        return d

    def stop(self) -> None:
        """No more rounds (``smtplab serve`` stopping, a test ending); the queue stays on disk as it is."""
        self.stopped = True
        if self.reports is not None:
            self.reports.stop()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    async def deliver_now(self, items: list[QueueItem]) -> None:
        """One delivery round for ``items`` of one domain, now, whatever their schedule (``lab.outbound.send``)."""
        if items:
            await self._deliver_domain(items[0].domain, items)

    def counter(self, domain: str) -> DomainCounters:
        return self.counters.setdefault(domain, DomainCounters())

    # -- scheduling

    def _schedule(self, delay: float) -> None:
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= self.clock.seconds() + delay:
                return
            self._timer.cancel()
        self._timer = self.clock.callLater(max(0.0, delay), self._wake)

    def _wake(self) -> None:
        self._timer = None
        if self._running:
            self._again = True
            return
        Deferred.fromCoroutine(self._run_due()).addErrback(self._crashed)

    def _crashed(self, failure: Any) -> None:
        self.maillog.alert("critical", "system", f"delivery engine error: {failure.getErrorMessage()}")

    async def _run_due(self) -> None:
        self._running = True
        try:
            previous: list[str] = []
            while not self.stopped:
                self._again = False
                due = self.queue.due(self.clock.seconds())
                if not due or [i.name for i in due] == previous:  # nothing moved: wait for the clock instead
                    break
                previous = [i.name for i in due]
                by_domain: dict[str, list[QueueItem]] = {}
                for item in due:
                    by_domain.setdefault(item.domain, []).append(item)
                await gatherResults(
                    [Deferred.fromCoroutine(self._deliver_domain(d, items)) for d, items in by_domain.items()]
                )
        finally:
            self._running = False
            nxt = self.queue.next_due()
            if nxt is not None and not self.stopped:
                self._schedule(max(nxt - self.clock.seconds(), MIN_WAIT))
            self._check_settled()

    def _check_settled(self) -> None:
        if self._running or len(self.queue):
            return
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    # -- one domain

    async def _deliver_domain(self, domain: str, items: list[QueueItem]) -> None:
        local = self.appliance.local_listener(domain)
        if local is not None:
            for item in items:
                self._deliver_locally(item, local.name)
            return
        answer = self.policy_source(domain, self.appliance.outbound.destinations.lookup(domain))
        applied = answer if isinstance(answer, AppliedPolicy) else await answer
        control = applied.control
        items = self._within_rate(domain, control, items)
        size = control.max_messages_per_connection
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        for start in range(0, len(chunks), control.max_concurrency):
            wave = chunks[start : start + control.max_concurrency]
            await gatherResults([Deferred.fromCoroutine(self._round(domain, applied, chunk)) for chunk in wave])

    def _within_rate(self, domain: str, control: DestinationControl, items: list[QueueItem]) -> list[QueueItem]:
        """The items that fit this hour's recipient allowance; the others wait until the allowance frees up."""
        limit = control.max_recipients_per_hour
        if limit is None:
            return items
        now = self.clock.seconds()
        recent = self._recent.setdefault(domain, deque())
        while recent and recent[0] + HOUR <= now:  # the same sum as the wait below: no float gap between them
            recent.popleft()
        allowed, out = limit - len(recent), []
        for item in items:
            if len(item.pending) <= allowed:
                allowed -= len(item.pending)
                out.append(item)
            else:
                later = (recent[0] + HOUR) if recent else now + HOUR
                self.queue.update(replace(item, next_attempt=later))
        return out

    def _deliver_locally(self, item: QueueItem, listener: str) -> None:
        """Mail for a domain the appliance accepts itself (a DSN to a local sender): into that listener's spool."""
        try:
            name = self.spool.for_listener(listener).deliver(self.queue.message(item))
        except (SpoolError, OSError) as exc:
            self._settle(item, {}, 0, f"local delivery failed: {exc}", "4.3.0")
            return
        self.maillog.mid_spooled(item.mid, name)
        self.counter(item.domain).delivered += len(item.pending)
        self.queue.update(item.with_recipients({r.rid: replace(r, state=QueueState.DELIVERED) for r in item.pending}))

    async def _round(self, domain: str, applied: AppliedPolicy, items: list[QueueItem]) -> None:
        """One delivery round for ``items``: each MX in turn until every recipient has an answer."""
        control = applied.control
        answers: dict[tuple[int, int], Answer] = {}
        dcid, reason, status = 0, f"no MX or address record for {domain}", NO_ROUTE_STATUS
        hosts = [(mx, ip) for mx in self.resolve(domain) for ip in mx.addresses]
        if not hosts:  # the virtual DNS has no route: a permanent failure (RFC 5321 5.1), bounced at once
            unroutable = Answer(550, NO_ROUTE_STATUS, f"{NO_ROUTE_STATUS} {reason}")
            for item in items:
                for r in item.pending:
                    answers[(item.mid, r.rid)] = unroutable
                    self.maillog.bounced(0, item.mid, r.rid, unroutable.text)
        required_failure: tuple[MXHost, ConnectionReport] | None = None
        for mx, ip in hosts:
            envelopes = self._envelopes(items, answers)
            if not envelopes:
                break
            report, attempt = await self._connection(domain, applied, mx, ip, envelopes)
            dcid = attempt.dcid
            answers.update(report.answers)
            if report.next is Next.DEFER:
                reason, status = f"TLS was required but could not be negotiated with {mx.exchange}", TLS_REQUIRED_STATUS
                if report.sts_result and applied.sts is not None and applied.sts.mode is Mode.ENFORCE:
                    reason = f"the MTA-STS policy of {domain} (enforce) refuses {mx.exchange}: {report.sts_reason}"
                elif report.certificate_problem:
                    reason = (
                        f"TLS was required with a verified certificate; {mx.exchange}'s: {report.certificate_problem}"
                    )
                if control.tls.required:
                    required_failure = required_failure or (mx, report)
                else:
                    reason = f"TLS failed after the 220 with {mx.exchange}: {report.tls_error}"
                    status = "4.7.5"
            elif report.failure is not None and required_failure is None:  # a TLS reason says more: it stays
                reason, status = f"{mx.exchange} ({ip}): {report.failure}", "4.4.1"
        for item in items:
            self._settle(item, answers, dcid, reason, status)
        if required_failure is not None:
            mx, report = required_failure
            self._alert_tls_required(domain, control, mx, report)

    def _envelopes(self, items: list[QueueItem], answers: dict[tuple[int, int], Answer]) -> list[Envelope]:
        out = []
        for item in items:
            rcpts = tuple((r.rid, r.address) for r in item.pending if (item.mid, r.rid) not in answers)
            if rcpts:
                out.append(Envelope(item.mid, item.sender, rcpts, self.queue.message(item)))
        return out

    # -- one connection

    async def _connection(
        self, domain: str, applied: AppliedPolicy, mx: MXHost, ip: str, envelopes: list[Envelope]
    ) -> tuple[ConnectionReport, DeliveryAttempt]:
        control = applied.control
        dcid = self.maillog.next_dcid()
        source = self.appliance.outbound_interface().address
        at = self.clock.seconds()
        self.maillog.dcid_new(dcid, source, ip, self.port)
        self.maillog.dcid_route(dcid, domain, mx.exchange, str(control.tls))
        report = ConnectionReport(peer_ip=ip)
        client = ScriptedClient(
            [],
            clock=self.clock,
            connect=lambda factory: self.connect(source, ip, self.port, factory),
            tls_factory=self.tls_factory,
            reply_timeout=self.reply_timeout,
            target=f"{mx.exchange} [{ip}]:{self.port}",
        )
        interpreter = DeliveryInterpreter(
            client,
            dcid=dcid,
            hostname=self.appliance.hostname,
            setting=control.tls,
            names=(mx.exchange, domain),
            trust_pems=self.trust_pems,
            envelopes=envelopes,
            maillog=self.maillog,
            report=report,
            client_cert="lab" if self.client_cert is not None else "none",
            sts=applied.sts,
        )
        record = await client.run(interpreter.deliver)
        self.entries[dcid] = record.entries
        if report.failure is not None:
            self.maillog.dcid_error(dcid, report.failure)
        self._log_answers(dcid, envelopes, report)
        self.maillog.dcid_close(dcid)
        counters = self.counter(domain)
        counters.connections += 1
        if report.tls:
            counters.tls_success += 1
        elif report.tls_event is not None:
            counters.tls_failure += 1
        attempt = self._attempt(dcid, at, domain, mx, ip, source, applied, envelopes, report)
        self.attempts.append(attempt)
        for listener in self.attempt_listeners:
            listener(attempt)
        return report, attempt

    def _log_answers(self, dcid: int, envelopes: list[Envelope], report: ConnectionReport) -> None:
        for envelope in envelopes:
            done = [
                rid for rid, _ in envelope.recipients if (a := report.answers.get((envelope.mid, rid))) and a.accepted
            ]
            if done:
                self.maillog.message_done(dcid, envelope.mid, done)
            for rid, _ in envelope.recipients:
                answer = report.answers.get((envelope.mid, rid))
                if answer is not None and answer.permanent:
                    self.maillog.bounced(dcid, envelope.mid, rid, answer.text)

    def _attempt(
        self,
        dcid: int,
        at: float,
        domain: str,
        mx: MXHost,
        ip: str,
        source: str,
        applied: AppliedPolicy,
        envelopes: list[Envelope],
        report: ConnectionReport,
    ) -> DeliveryAttempt:
        answers = list(report.answers.values())
        if any(a.accepted for a in answers):
            outcome = Outcome.DELIVERED
        elif answers and all(a.permanent for a in answers):
            outcome = Outcome.BOUNCED
        elif answers or report.carried:
            outcome = Outcome.DEFERRED
        else:
            outcome = Outcome.NOT_SENT
        event = report.tls_event
        found = None if event is None else result_type(event, report.certificate_problem)
        reason = report.tls_error or report.failure
        if applied.sts is not None and event is not None:
            found, reason = report.sts_result, report.sts_reason if report.sts_result else reason
        elif applied.error is not None:  # MTA-STS published but no policy to be had: that failure is reported
            found, reason = applied.error.result_type, applied.error.reason
        return DeliveryAttempt(
            dcid=dcid,
            at=at,
            domain=domain,
            mx_host=mx.exchange,
            receiving_ip=ip,
            sending_ip=source,
            tls_setting=str(applied.control.tls),
            mids=tuple(e.mid for e in envelopes),
            receiving_helo=report.receiving_helo,
            tls=report.tls,
            tls_version=report.tls_version,
            cipher=report.cipher,
            certificate_verified=report.certificate_verified,
            result_type=found,
            failure_reason=reason,
            outcome=outcome,
            policy_type=applied.policy_type,
            policy_strings=applied.policy_strings,
        )

    # -- what becomes of each recipient

    def _settle(
        self,
        item: QueueItem,
        answers: dict[tuple[int, int], Answer],
        dcid: int,
        reason: str,
        status: str,
    ) -> None:
        now = self.clock.seconds()
        counters = self.counter(item.domain)
        updates: dict[int, QueuedRecipient] = {}
        bounced: list[QueuedRecipient] = []
        waiting: list[QueuedRecipient] = []
        for r in item.pending:
            answer = answers.get((item.mid, r.rid))
            if answer is not None and answer.accepted:
                updates[r.rid] = replace(r, state=QueueState.DELIVERED, reason=answer.text, status=answer.status)
                counters.delivered += 1
                self._recent.setdefault(item.domain, deque()).append(now)
            elif answer is not None and answer.permanent:
                updates[r.rid] = replace(r, state=QueueState.BOUNCED, reason=answer.text, status=answer.status)
                bounced.append(updates[r.rid])
            else:
                text, code = (answer.text, answer.status) if answer is not None else (reason, status)
                waiting.append(replace(r, reason=text, status=code))
        last = waiting[0].reason if waiting else item.last_reason
        item = replace(item.with_recipients(updates), last_reason=last)
        if waiting:
            attempts = item.attempts + 1
            profile = self.appliance.outbound.bounce_profile(
                self.appliance.outbound.destinations.lookup(item.domain).bounce_profile
            )
            next_at = now + profile.wait_before(attempts)
            if profile.gives_up(attempts, item.queued_at, next_at):
                for r in waiting:
                    why = f"delivery time expired after {attempts} attempts: {r.reason}"
                    updates[r.rid] = replace(r, state=QueueState.BOUNCED, reason=why, status=EXPIRED_STATUS)
                    self.maillog.bounced(dcid, item.mid, r.rid, why)
                    bounced.append(updates[r.rid])
                item = item.with_recipients(updates)
            else:
                for r in waiting:
                    self.maillog.delayed(dcid, item.mid, r.rid, r.reason)
                    updates[r.rid] = r
                counters.deferred += len(waiting)
                item = replace(item.with_recipients(updates), attempts=attempts, next_attempt=next_at)
        counters.bounced += len(bounced)
        if bounced:
            self._bounce(item, bounced)  # before the update: a finished item's message leaves the queue with it
        self.queue.update(item)

    def _bounce(self, item: QueueItem, bounced: list[QueuedRecipient]) -> None:
        """A DSN to the envelope sender; never for a message with the null sender (a DSN itself)."""
        profile = self.appliance.outbound.bounce_profile(
            self.appliance.outbound.destinations.lookup(item.domain).bounce_profile
        )
        if not item.sender or item.is_dsn or not profile.send_bounces:
            return
        failed = [FailedRecipient(r.address, _failed_status(r.status), r.reason) for r in bounced]
        now = self.clock.seconds()
        data = build_dsn(
            reporting_mta=self.appliance.hostname,
            mid=item.mid,
            sender=item.sender,
            recipients=failed,
            original=self.queue.message(item),
            arrival=item.queued_at,
            now=now,
        )
        mid = self.maillog.next_mid()
        self.maillog.mid_ready(mid, len(data))
        try:
            self.queue.enqueue(data, mid=mid, sender="", recipients=[(0, item.sender)], now=now, is_dsn=True)
        except SpoolError as exc:
            self.maillog.alert("critical", "system", f"DSN for MID {item.mid} not queued: {exc}")
            return
        self.kick()

    def _alert_tls_required(
        self, domain: str, control: DestinationControl, mx: MXHost, report: ConnectionReport
    ) -> None:
        why = report.tls_error or (str(report.tls_event) if report.tls_event else "TLS not negotiated")
        if report.sts_result:
            why = f"the MTA-STS policy refuses it ({report.sts_result}: {report.sts_reason})"
        elif report.certificate_problem:
            why = f"the certificate did not verify ({report.certificate_problem})"
        text = (
            f"TLS was required for domain {domain} ({control.tls}) but could not be negotiated with"
            f" {mx.exchange} [{report.peer_ip}]: {why}; the message is queued for retry"
        )
        self.alerts.send("warning", "system", f"TLS required for {domain} failed", text)


def _failed_status(status: str) -> str:
    """RFC 3464 2.3.4: a failed recipient's Status is a permanent (5.x.x) code."""
    if len(status) > 1 and status[0] in "245" and status[1] == ".":
        return "5" + status[1:]
    return EXPIRED_STATUS


def alert_mailbox_root(state_dir: Path) -> Path:
    """Where the alert recipients' mailboxes are: ``<state>/alerts/<address>/new``."""
    return state_dir / "alerts"
