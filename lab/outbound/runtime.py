"""Wiring: the appliance's delivery engine inside a topology, over a carrier (the lab runtime's outbound side).

The engine needs three things from outside: a resolver (the topology's virtual DNS), a connect function (the
carrier, with the middleboxes the topology puts between the appliance and the receiving host) and the
appliance's certificates (the lab CA it trusts, the outbound certificate it presents). ``smtplab serve`` has no
topology, so it builds no engine: see docs/outbound.md, "What smtplab serve does".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory

from lab.net.carrier import ICarrier
from lab.net.topology import Topology
from lab.outbound.alerts import Alerts
from lab.outbound.engine import DeliveryEngine, PolicySource, alert_mailbox_root
from lab.outbound.published import MtaStsSource
from lab.outbound.queue import OutboundQueue
from lab.outbound.reports import TlsReports
from lab.smtp.listener import ApplianceRuntime


def topology_connect(topology: Topology, carrier: ICarrier) -> Any:
    """The carrier's connect from the appliance host, through the middleboxes on the path to the receiver."""
    appliance_host = topology.appliance_host().name

    def connect(source: str, target: str, port: int, factory: ClientFactory) -> Deferred[Any]:
        receiver = topology.host_by_address(target)
        boxes = topology.middleboxes_between(appliance_host, receiver.name) if receiver is not None else ()
        result: Deferred[Any] = carrier.connect(source, target, port, factory, middleboxes=boxes)
        return result

    return connect


def attach_outbound(
    runtime: ApplianceRuntime,
    topology: Topology,
    carrier: ICarrier,
    *,
    queue_dir: Path | None = None,
    policy_source: PolicySource | None = None,
    daily_tls_reports: bool = True,
) -> DeliveryEngine:
    """Give ``runtime`` a delivery engine (its queue under ``<state>/queue``, reloaded if it is there) and
    start it: what the queue already holds is delivered as it falls due; RELAY listeners feed it. The domains'
    published policies apply (MTA-STS over the topology's DNS and policy hosts) unless ``policy_source`` says
    otherwise. ``engine.reports`` writes and mails the TLS-RPT reports (RFC 8460) under ``<state>/tlsrpt``, at
    each UTC midnight of the run's clock unless ``daily_tls_reports`` is False (then on demand: ``send_reports``)."""
    appliance = runtime.appliance
    queue = OutboundQueue(queue_dir or runtime.state_dir / "queue")
    for path, size in queue.recovered:
        runtime.maillog.spool_leftover(path, size, delivered=False)
    certificate = appliance.outbound.certificate
    client_cert = runtime.certificate_named(certificate) if certificate is not None else None
    engine = DeliveryEngine(
        appliance,
        queue,
        clock=runtime.clock,
        maillog=runtime.maillog,
        resolve=topology.mx,
        connect=topology_connect(topology, carrier),
        spool=runtime.spool,
        alerts=Alerts(appliance, alert_mailbox_root(runtime.state_dir), runtime.maillog, runtime.clock.seconds),
        trust_pems=(runtime.ca.ca_pem,),
        client_cert=client_cert,
        keylog=runtime.keylog,
        policy_source=policy_source
        or MtaStsSource.for_topology(topology, carrier, trust_pems=(runtime.ca.ca_pem,), maillog=runtime.maillog),
    )
    runtime.outbound = engine
    engine.reports = TlsReports(engine, txt=topology.txt, directory=runtime.state_dir / "tlsrpt")
    if daily_tls_reports:
        engine.reports.start()
    engine.kick()
    return engine
