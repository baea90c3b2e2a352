"""The appliance as a sender, for another component: deliver one message to one receiver under one
destination-control setting, and get back every ``DeliveryAttempt`` and what became of the message.

This is the seam the sender-judging runner plugs the appliance into: it names a receiver (an address on a
carrier it listens on) and a TLS setting; this builds a one-domain appliance around the real delivery engine
(the same queue, client, TLS rule and mail log as the lab runtime) and runs one delivery round, without retries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory

from lab.appliance.maillog import MailLog
from lab.appliance.model import Appliance, Interface, Outbound
from lab.appliance.spool import Spool
from lab.net.carrier import ICarrier
from lab.net.topology import MXHost
from lab.outbound.alerts import Alerts
from lab.outbound.attempt import DeliveryAttempt
from lab.outbound.engine import DeliveryEngine, DomainCounters
from lab.outbound.queue import OutboundQueue
from lab.policy.destinations import BounceProfile, DestinationControl, DestinationControls, DestinationTLS
from lab.smtp.transcript import Entry
from lab.tls.certs import CertKey, LabCA
from lab.tls.tlsctx import KeyLog

DEFAULT_MESSAGE = (
    b"From: <sender@esa.lab.example>\r\nTo: <rcpt@receiver.test>\r\nSubject: smtplab delivery\r\n\r\nhello\r\n"
)


@dataclass(frozen=True)
class SendResult:
    """``state``: ``delivered`` (every recipient accepted), ``bounced`` (one refused for good) or ``deferred``
    (a temporary failure: the appliance would retry later)."""

    state: str
    attempts: tuple[DeliveryAttempt, ...]
    log: tuple[str, ...]  # the mail-log lines of the delivery
    entries: dict[int, list[Entry]] = field(default_factory=dict)  # DCID -> the client's transcript, as entries
    counters: DomainCounters = field(default_factory=DomainCounters)


def deliver_one(
    *,
    carrier: ICarrier,
    receiver_ip: str,
    setting: DestinationTLS,
    state_dir: Path,
    receiver_port: int = 25,
    domain: str = "receiver.test",
    mx_host: str | None = None,
    sender: str = "sender@esa.lab.example",
    recipients: Sequence[str] = ("rcpt@receiver.test",),
    data: bytes = DEFAULT_MESSAGE,
    trust_pems: Sequence[bytes] | None = None,
    hostname: str = "esa.lab.example",
    source_ip: str = "192.168.2.1",
    reply_timeout: float = 30.0,
    middleboxes: Sequence[Any] = (),
    client_cert: CertKey | None = None,
    keylog: KeyLog | None = None,
) -> Deferred[SendResult]:
    """Deliver ``data`` to ``receiver_ip:receiver_port`` (the one MX of ``domain``, called ``mx_host``, by
    default ``mx.<domain>``) under ``setting``. The receiver's certificate is checked against ``trust_pems``
    (default: the lab CA in ``state_dir``); ``client_cert`` is presented to a receiver that asks for one;
    ``middleboxes`` sit on the path. Drive the carrier until the Deferred fires (``carrier.run_until``)."""
    mx = MXHost(mx_host or f"mx.{domain}", 0, (receiver_ip,))
    control = DestinationControl(domain=domain, tls=setting)
    outbound = Outbound(
        destinations=DestinationControls(control, {domain: control}),
        bounce_profiles={"Default": BounceProfile(max_retries=1_000_000)},  # a temporary failure stays deferred
        alerts_enabled=False,
    )
    appliance = Appliance(hostname, {"PublicNet": Interface("PublicNet", source_ip)}, {}, (), outbound=outbound)
    lines: list[str] = []
    maillog = MailLog(None, clock=carrier.clock.seconds, echo=lines.append)
    queue = OutboundQueue(state_dir / "send-queue")
    trust = tuple(trust_pems) if trust_pems is not None else (LabCA(state_dir).ca_pem,)

    def connect(source: str, target: str, port: int, factory: ClientFactory) -> Deferred[object]:
        result: Deferred[object] = carrier.connect(source, target, receiver_port, factory, middleboxes=middleboxes)
        return result

    engine = DeliveryEngine(
        appliance,
        queue,
        clock=carrier.clock,
        maillog=maillog,
        resolve=lambda wanted: (mx,) if wanted.rstrip(".").lower() == domain.lower() else (),
        connect=connect,
        spool=Spool(state_dir / "send-spool"),
        alerts=Alerts(appliance, state_dir / "send-alerts", maillog, carrier.clock.seconds),
        trust_pems=trust,
        client_cert=client_cert,
        keylog=keylog,
        port=receiver_port,
        reply_timeout=reply_timeout,
    )
    engine.stop()  # no scheduled rounds: exactly one, below
    mid = maillog.next_mid()
    items = queue.enqueue(
        data, mid=mid, sender=sender, recipients=list(enumerate(recipients)), now=carrier.clock.seconds()
    )

    async def run() -> SendResult:
        await engine.deliver_now(items)
        counters = engine.counter(domain)
        if counters.bounced:
            state = "bounced"
        elif counters.delivered == len(recipients):
            state = "delivered"
        else:
            state = "deferred"
        return SendResult(state, tuple(engine.attempts), tuple(lines), dict(engine.entries), counters)

    return Deferred.fromCoroutine(run())
