"""One delivery through the lab, for ``tlsverify`` and the outbound lesson: what the appliance does when it sends
one message to a domain under that domain's destination control.

The domain's MX hosts come from the topology's virtual DNS. The memory network serves nothing by itself, so
every address of every MX host of the domain is served by the lab's receiving MTA (``lab.smtp.remote_mta``)
named after the host, in the mode ``receiver_mode`` picks (a ``--receiver`` override, else the host's
behaviour hint: a ``skip`` host offers no STARTTLS, any other presents a lab-CA certificate for its names).
The delivery itself is the real engine (``lab.outbound.runtime.attach_outbound``: queue, client, TLS decision
table, mail log, alerts), stopped after one round, so a deferral is reported rather than retried.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from twisted.internet import task
from twisted.internet.defer import Deferred

from lab.appliance.maillog import MailLog
from lab.appliance.model import Appliance
from lab.appliance.spool import Spool
from lab.errors import BadInput
from lab.net.memory import MemoryNetwork
from lab.net.topology import MXHost, Topology
from lab.outbound.alerts import SentAlert
from lab.outbound.attempt import DeliveryAttempt
from lab.outbound.published import serve_topology_policies
from lab.outbound.runtime import attach_outbound
from lab.policy.destinations import DestinationControl
from lab.smtp.listener import ApplianceRuntime
from lab.smtp.remote_mta import RemoteMTAFactory
from lab.smtp.transcript import Entry
from lab.tls.certs import LabCA, demo_certificate
from lab.tls.tlsctx import ServerTLS

#: Receiver modes: what the lab's receiving MTA does at an MX host's address.
RECEIVER_MODES = {
    "tls": "offers STARTTLS, presents a lab-CA certificate for its name",
    "no-starttls": "offers no STARTTLS (its EHLO reply has no 250-STARTTLS)",
    "454": "answers STARTTLS with 454 (TLS not available)",
    "garbage-after-220": "answers STARTTLS with 220, then sends garbage instead of a TLS handshake",
    "handshake-fail": "answers STARTTLS with 220, then fails the TLS handshake",
    "wrong-name": "offers STARTTLS, presents a lab-CA certificate for another name (wrong.name.example)",
    "untrusted": "offers STARTTLS, presents the self-signed built-in demo certificate (no trusted CA)",
}
_STARTTLS = {"tls": "ok", "no-starttls": "absent", "wrong-name": "ok", "untrusted": "ok"}
WRONG_NAME = "wrong.name.example"

#: Virtual time of the delivery: Wed Dec  2 08:00:00 2026 UTC (a virtual clock starts anywhere; a fixed start
#: keeps transcripts and lessons reproducible).
START = 1_796_198_400


def parse_receivers(items: list[str]) -> dict[str, str]:
    """``HOST=MODE`` overrides (``--receiver``); ``BadInput`` naming the bad one."""
    out: dict[str, str] = {}
    for item in items:
        host, _, mode = item.partition("=")
        if not host or mode not in RECEIVER_MODES:
            raise BadInput(f"{item!r}: expected HOST=MODE, MODE one of {', '.join(RECEIVER_MODES)}", field="--receiver")
        out[host.strip().lower().rstrip(".")] = mode
    return out


def receiver_mode(topology: Topology, mx: MXHost, overrides: Mapping[str, str]) -> str:
    """The mode the lab serves ``mx`` in: the override, else ``no-starttls`` for a host whose behaviour hint is
    ``skip`` (a legacy MTA that never uses STARTTLS), else ``tls``."""
    if mx.exchange in overrides:
        return overrides[mx.exchange]
    for ip in mx.addresses:
        host = topology.host_by_address(ip)
        if host is not None and host.behaviour == "skip":
            return "no-starttls"
    return "tls"


@dataclass(frozen=True)
class ServedReceiver:
    mx: MXHost
    mode: str

    def describe(self) -> str:
        return RECEIVER_MODES[self.mode]


@dataclass
class DeliveryReport:
    """What one delivery did: the control applied, who was served, every connection, the mail log, alerts."""

    domain: str
    control: DestinationControl
    receivers: list[ServedReceiver]
    attempts: list[DeliveryAttempt] = field(default_factory=list)
    transcripts: dict[int, list[Entry]] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    alerts: list[SentAlert] = field(default_factory=list)
    alert_messages: list[tuple[str, bytes]] = field(default_factory=list)  # (mailbox, message) in order
    state: str = "deferred"  # delivered | deferred | bounced

    @property
    def tls(self) -> bool:
        return any(a.tls for a in self.attempts)


def deliver(
    appliance: Appliance,
    topology: Topology,
    domain: str,
    *,
    overrides: Mapping[str, str] | None = None,
    state_dir: Path | None = None,
    sender: str | None = None,
) -> DeliveryReport:
    """Send one message to ``postmaster@DOMAIN`` through the lab and report what happened (one round)."""
    domain = domain.strip().rstrip(".").lower()
    if state_dir is None:
        with tempfile.TemporaryDirectory(prefix="smtplab-delivery-") as scratch:
            return deliver(appliance, topology, domain, overrides=overrides, state_dir=Path(scratch), sender=sender)
    overrides = overrides or {}
    clock = task.Clock()
    clock.advance(START)
    net = MemoryNetwork(clock)
    log: list[str] = []
    runtime = ApplianceRuntime(
        appliance,
        clock=net.clock,
        maillog=MailLog(None, clock=net.clock.seconds, echo=log.append),
        spool=Spool(state_dir / "spool"),
        state_dir=state_dir / "state",
    )
    report = DeliveryReport(domain, appliance.outbound.destinations.lookup(domain), [], log=log)
    ca = LabCA(state_dir / "state")
    for number, mx in enumerate(topology.mx(domain)):
        mode = receiver_mode(topology, mx, overrides)
        report.receivers.append(ServedReceiver(mx, mode))
        if mode in ("wrong-name", "untrusted"):
            names = [WRONG_NAME]
            certkey = demo_certificate() if mode == "untrusted" else ca.issue(f"mx{number}-wrong", names)
        else:
            certkey = ca.issue(f"mx{number}", [mx.exchange])
        factory = RemoteMTAFactory(
            mx.exchange, starttls=_STARTTLS.get(mode, mode), tls_server=ServerTLS(certkey), clock=net.clock
        )
        for ip in mx.addresses:
            net.listen(ip, 25, factory)
    serve_topology_policies(topology, net, ca)  # the MTA-STS policy hosts (docs/topology-format.md, mta_sts)
    engine = attach_outbound(runtime, topology, net)
    engine.stop()  # one round, below: a deferral is reported, not retried
    message = (
        f"From: <{sender or 'postmaster@' + appliance.hostname}>\r\nTo: <postmaster@{domain}>\r\n"
        f"Subject: smtplab delivery to {domain}\r\n\r\nA test message from the appliance.\r\n"
    ).encode()
    items = engine.queue.enqueue(
        message,
        mid=runtime.maillog.next_mid(),
        sender=sender or f"postmaster@{appliance.hostname}",
        recipients=[(0, f"postmaster@{domain}")],
        now=net.clock.seconds(),
    )
    net.run_until(Deferred.fromCoroutine(engine.deliver_now(items)), timeout=600)
    counters = engine.counter(domain)
    report.state = "bounced" if counters.bounced else "delivered" if counters.delivered else "deferred"
    report.attempts = list(engine.attempts)
    report.transcripts = {dcid: list(entries) for dcid, entries in engine.entries.items()}
    report.alerts = list(engine.alerts.sent)
    for alert in engine.alerts.sent:
        report.alert_messages.extend((path.parent.parent.name, path.read_bytes()) for path in alert.mailed)
    return report
