"""A small lab for the outbound tests: an appliance, receiving MTAs and the virtual DNS, over the memory carrier.

``dest.test`` has two MX hosts (mx1 preference 10, mx2 preference 20), each a ``RemoteMTAFactory`` with a
lab-CA certificate for its own name; ``example.com`` is the appliance's own domain (the DSNs to its senders
land in the Inboundmail spool). With ``sts`` (a mode), dest.test publishes MTA-STS (``_mta-sts`` TXT, a policy
host ``sts`` for mta-sts.dest.test); with ``tlsrpt`` it publishes TLS-RPT (``_smtp._tls`` TXT,
rua=mailto:tlsrpt@dest.test) and the appliance sends its reports at each UTC midnight of the virtual clock.
"""

from __future__ import annotations

import email
from email.message import Message
from pathlib import Path
from typing import Any

from labruntime import lab_runtime

from lab.appliance.maillog import MailLog, parse_line
from lab.net.capture import Direction
from lab.net.memory import MemoryNetwork
from lab.net.topology import Topology, load_topology
from lab.outbound.engine import DeliveryEngine
from lab.outbound.published import serve_topology_policies
from lab.outbound.runtime import attach_outbound
from lab.smtp.listener import ApplianceRuntime
from lab.smtp.remote_mta import RemoteMTAFactory
from lab.tls.certs import LabCA
from lab.tls.tlsctx import ServerTLS

APPLIANCE = """\
hostname: esa.lab.example
interfaces:
  - {{name: PublicNet, address: 192.168.2.1}}
  - {{name: PrivateNet, address: 192.168.1.1}}
certificates:
  - {{name: esa-lab, kind: lab, hostnames: [esa.lab.example]}}
listeners:
  - {{name: Inboundmail, type: public, interface: PublicNet, rat: [example.com]}}
  - name: Outboundmail
    type: private
    interface: PrivateNet
    hat:
      sender_groups:
        - {{name: RELAYLIST, members: [192.168.1.0/24]}}
outbound:
  interface: PublicNet
  certificate: esa-lab
  default_destination: {{tls: preferred}}
  destination_controls:
    - {{domain: dest.test, tls: "{tls}", max_messages_per_connection: {per_connection},
       max_concurrency: {concurrency}, max_recipients_per_hour: {per_hour}}}
  bounce_profiles:
    - {{name: Default, initial_wait: 60, max_wait: 240, max_retries: {retries}, max_time_in_queue: 3600}}
  alerts:
    recipients:
      - {{address: admin@example.com, classes: [system], severities: [warning]}}
"""

TOPOLOGY = """\
networks:
  - {name: internet, subnet: 198.51.100.0/24}
  - {name: PublicNet, subnet: 192.168.2.0/24}
  - {name: PrivateNet, subnet: 192.168.1.0/24}
hosts:
  - {name: esa, role: appliance, addresses: [192.168.2.1, 192.168.1.1], dns_names: [esa.lab.example],
     appliance: appliance.yaml}
  - {name: mx1, role: mta, addresses: [198.51.100.11], dns_names: [mx1.dest.test]}
  - {name: mx2, role: mta, addresses: [198.51.100.12], dns_names: [mx2.dest.test]}
  - {name: internal, role: internal, addresses: [192.168.1.25], dns_names: [mail.example.com]}
{sts_host}dns:
  - {type: MX, domain: dest.test, preference: 20, exchange: mx2.dest.test}
  - {type: MX, domain: dest.test, preference: 10, exchange: mx1.dest.test}
  - {type: MX, domain: example.com, preference: 10, exchange: esa.lab.example}
{sts_records}links:
  - {between: [esa, mx1]}
  - {between: [esa, mx2]}
  - {between: [esa, internal]}
{sts_policy}"""

STS_HOST = "  - {name: sts, role: mta, addresses: [198.51.100.13], dns_names: [mta-sts.dest.test]}\n"
STS_RECORDS = '  - {type: TXT, name: _mta-sts.dest.test, text: "v=STSv1; id=1"}\n'
TLSRPT_RECORDS = '  - {type: TXT, name: _smtp._tls.dest.test, text: "v=TLSRPTv1; rua=mailto:tlsrpt@dest.test"}\n'
STS_POLICY = "mta_sts:\n  - {{domain: dest.test, host: sts, mode: {mode}, mx: [{mx}], max_age: {max_age}}}\n"

MESSAGE = b"From: <alice@example.com>\r\nTo: <bob@dest.test>\r\nSubject: hello\r\n\r\n.a line with a dot\r\nbye\r\n"


class OutboundLab:
    def __init__(
        self,
        root: Path,
        *,
        tls: str = "preferred",
        mx1: str | None = "ok",
        mx2: str | None = None,
        retries: int = 3,
        per_connection: int = 50,
        concurrency: int = 500,
        per_hour: int | None = None,
        mx1_names: tuple[str, ...] = ("mx1.dest.test",),
        net: Any = None,
        sts: str | None = None,
        sts_mx: str = "mx1.dest.test, mx2.dest.test",
        sts_max_age: int = 86400,
        serve_sts: bool = True,
        tlsrpt: bool = False,
    ) -> None:
        root.mkdir(parents=True, exist_ok=True)
        (root / "appliance.yaml").write_text(
            APPLIANCE.format(
                tls=tls,
                retries=retries,
                per_connection=per_connection,
                concurrency=concurrency,
                per_hour="null" if per_hour is None else per_hour,
            )
        )
        (root / "topology.yaml").write_text(
            TOPOLOGY.replace("{sts_host}", STS_HOST if sts else "")
            .replace("{sts_records}", (STS_RECORDS if sts else "") + (TLSRPT_RECORDS if tlsrpt else ""))
            .replace("{sts_policy}", STS_POLICY.format(mode=sts, mx=sts_mx, max_age=sts_max_age) if sts else "")
        )
        self.root = root
        self.topology: Topology = load_topology(root / "topology.yaml")
        self.net = net or MemoryNetwork()
        self.lines: list[str] = []
        maillog = MailLog(None, clock=self.net.clock.seconds, echo=self.lines.append)
        self.runtime: ApplianceRuntime = lab_runtime(self.topology.appliance(), self.net.clock, root, maillog=maillog)
        ca = LabCA(root / "state")
        self.mtas: dict[str, RemoteMTAFactory] = {}
        for name, mode, ip, names in (
            ("mx1", mx1, "198.51.100.11", mx1_names),
            ("mx2", mx2, "198.51.100.12", ("mx2.dest.test",)),
        ):
            if mode is None:
                continue
            server = ServerTLS(ca.issue(f"{name}-{'-'.join(names)}", list(names)))
            mta = RemoteMTAFactory(f"{name}.dest.test", starttls=mode, tls_server=server, clock=self.net.clock)
            self.net.listen(ip, 25, mta)
            self.mtas[name] = mta
        self.policy_ports = serve_topology_policies(self.topology, self.net, ca) if serve_sts else []
        self.engine: DeliveryEngine = attach_outbound(self.runtime, self.topology, self.net, daily_tls_reports=tlsrpt)

    def send(self, data: bytes = MESSAGE, sender: str = "alice@example.com", to: tuple[str, ...] = ("bob@dest.test",)):
        mid = self.runtime.maillog.next_mid()
        return self.engine.enqueue(data, mid=mid, sender=sender, recipients=list(enumerate(to)))

    def run(self) -> None:
        self.net.run()

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The mail-log lines read back (``lab.appliance.maillog.parse_line``), optionally of one event."""
        return [fields for fields in map(parse_line, self.lines) if name is None or fields["event"] == name]

    def texts(self) -> list[str]:
        return [line.split(": ", 1)[1] for line in self.lines]

    def clear_bytes(self, mta: str = "mx1") -> bytes:
        """What the appliance sent to ``mta`` in the clear: its segments up to the first TLS record, per flow."""
        ip = {"mx1": "198.51.100.11", "mx2": "198.51.100.12"}[mta]
        out = b""
        for flow in self.net.capture.flows:
            if flow.server.ip != ip:
                continue
            for segment in flow.segments:
                if segment.direction is Direction.C2S:
                    if segment.data[:1] in (b"\x16", b"\x17", b"\x15") and segment.data[1:2] == b"\x03":
                        break  # TLS from here on
                    out += segment.data
        return out

    def inbox(self, listener: str = "Inboundmail") -> list[Message]:
        maildir = self.runtime.spool.for_listener(listener)
        return [email.message_from_bytes(p.read_bytes()) for p in maildir.messages()]

    def alerts(self, address: str = "admin@example.com") -> list[Message]:
        new = self.root / "state" / "alerts" / address / "new"
        return [email.message_from_bytes(p.read_bytes()) for p in sorted(new.iterdir())] if new.is_dir() else []
