"""One virtual day of the built-in lab's outbound mail: MTA-STS applied, TLS-RPT sent (docs/outbound-reporting.md).

Everything is the lab's real parts on the memory carrier, in the built-in topology (lab/defaults/): the internal
server mail.example.com relays two messages through the appliance's Outboundmail listener (RELAY into the
delivery queue); the delivery engine takes them to the MX hosts under the destination controls and
secure.example's MTA-STS policy (enforce, fetched from its HTTPS policy host). In the morning mx.secure.example
presents a certificate for another name, so enforce refuses it until its operator fixes the certificate; at
midnight the appliance writes the day's TLS-RPT report for secure.example and mails it to tlsrpt@secure.example,
which mx.secure.example receives. The mail log is what ``smtplab track`` and ``smtplab tls-report`` read.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from twisted.internet import task
from twisted.internet.protocol import ClientFactory

from lab.appliance.maillog import MailLog
from lab.appliance.spool import MaildirNames, Spool
from lab.net.memory import MemoryNetwork
from lab.net.topology import Topology, default_topology
from lab.outbound.published import serve_topology_policies
from lab.outbound.reports import SentReport
from lab.outbound.runtime import attach_outbound
from lab.smtp.behaviours import behaviour_steps
from lab.smtp.client import ScriptedClient
from lab.smtp.listener import ApplianceRuntime
from lab.smtp.remote_mta import ReceivedMessage, RemoteMTAFactory
from lab.tls.certs import LabCA
from lab.tls.tlsctx import ClientTLSFactory, ServerTLS

START = 1_796_198_400  # Wed Dec  2 08:00:00 2026 UTC
HOUR = 3600.0
#: (hours after 08:00, sender, recipient): what mail.example.com relays through the appliance.
MESSAGES = ((1.0, "alice@example.com", "carol@secure.example"), (1.25, "bob@example.com", "dave@partner.example"))
CERTIFICATE_FIXED = 1.1  # hours after 08:00: mx.secure.example presents a certificate for its own name
END = 16.25  # hours after 08:00: 00:15 the next day, after the midnight report went out


@dataclass
class DayResult:
    """What the day left: the mail log lines, what each MX received, the TLS-RPT reports sent."""

    log: list[str]
    received: dict[str, list[ReceivedMessage]]
    reports: list[SentReport]

    def report_json(self, index: int = 0) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(gzip.decompress(self.reports[index].path.read_bytes()))
        return data


def outbound_day(
    state_dir: Path, log_file: TextIO | None = None, say: Callable[[str], None] | None = None
) -> DayResult:
    """Run the day under ``state_dir`` (spool, queue, tlsrpt/, the lab CA); ``log_file`` gets the mail log,
    ``say`` each mail-log line as it is written."""
    clock = task.Clock()
    clock.advance(START)
    net = MemoryNetwork(clock)
    topology = default_topology()
    lines: list[str] = []

    def echo(line: str) -> None:
        lines.append(line)
        if say is not None:
            say(line)

    appliance = topology.appliance()
    runtime = ApplianceRuntime(
        appliance,
        clock=net.clock,
        maillog=MailLog(log_file, clock=net.clock.seconds, echo=echo),
        spool=Spool(state_dir / "spool", name_source=MaildirNames(net.clock.seconds, host=appliance.hostname, pid=1)),
        state_dir=state_dir / "state",
        reverse_dns=topology.reverse_name,
    )
    for listener in appliance.listeners:
        net.listen(appliance.interfaces[listener.interface].address, listener.port, runtime.factory(listener))
    ca = runtime.ca
    mtas, ports = _serve_mx_hosts(topology, net, ca)
    serve_topology_policies(topology, net, ca)
    engine = attach_outbound(runtime, topology, net)
    for hours, sender, recipient in MESSAGES:
        clock.callLater(hours * HOUR, _relay, net, topology, runtime, sender, recipient)
    clock.callLater(CERTIFICATE_FIXED * HOUR, _fix_certificate, net, ca, mtas, ports)
    net.run_until(task.deferLater(clock, END * HOUR, lambda: None), timeout=END * HOUR + 60)
    engine.stop()
    reports = engine.reports.sent if engine.reports is not None else []
    return DayResult(lines, {name: list(mta.messages) for name, mta in mtas.items()}, reports)


def _serve_mx_hosts(
    topology: Topology, net: MemoryNetwork, ca: LabCA
) -> tuple[dict[str, RemoteMTAFactory], dict[str, list[Any]]]:
    """mx.secure.example with a certificate for another name (the morning's mistake), mx.partner.example with
    its own: the lab's receiving MTA on port 25 of each."""
    served = {
        "mx.secure.example": ca.issue("labday-wrong-name", ["www.secure.example"]),
        "mx.partner.example": ca.issue("labday-partner", ["mx.partner.example"]),
    }
    mtas, ports = {}, {}
    for name, certkey in served.items():
        mtas[name] = RemoteMTAFactory(name, tls_server=ServerTLS(certkey), clock=net.clock)
        ports[name] = [net.listen(address, 25, mtas[name]) for address in topology.forward(name)]
    return mtas, ports


def _fix_certificate(
    net: MemoryNetwork, ca: LabCA, mtas: dict[str, RemoteMTAFactory], ports: dict[str, list[Any]]
) -> None:
    """The operator of mx.secure.example installs a certificate for its own name (the same MTA, same mailbox)."""
    old = mtas["mx.secure.example"]
    fixed = RemoteMTAFactory(
        "mx.secure.example", tls_server=ServerTLS(ca.issue("labday-secure", ["mx.secure.example"])), clock=net.clock
    )
    fixed.messages = old.messages
    for port in ports["mx.secure.example"]:
        port.stopListening()
        net.listen(port.getHost().host, 25, fixed)
    mtas["mx.secure.example"] = fixed


def _relay(net: MemoryNetwork, topology: Topology, runtime: ApplianceRuntime, sender: str, recipient: str) -> None:
    """mail.example.com hands one message to the appliance's Outboundmail listener (plaintext, RELAYLIST)."""
    internal = topology.host("mail-internal")
    listener = runtime.appliance.listener("Outboundmail")
    server = runtime.appliance.interfaces[listener.interface].address
    steps = behaviour_steps("skip", ehlo=internal.dns_names[0], mail_from=sender, rcpt_to=(recipient,))

    def connect(factory: ClientFactory) -> Any:
        return net.connect(internal.address, server, listener.port, factory)

    client = ScriptedClient(steps, clock=net.clock, connect=connect, tls_factory=ClientTLSFactory(), target=server)
    client.run()
