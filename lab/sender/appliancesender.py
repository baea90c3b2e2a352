"""The ``appliance`` sender kind: the appliance's own outbound delivery (``lab.outbound.send.deliver_one``: the
delivery engine, its TLS decision table and its mail log) under one destination control, in memory on virtual
time, judged against the receiver cases like any other sender.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lab.errors import HarnessError
from lab.net.capture import Capture
from lab.net.carrier import open_carrier
from lab.outbound.send import deliver_one
from lab.policy.destinations import DestinationTLS, parse_destination_tls
from lab.policy.modes import DeliveryTLS
from lab.sender.cases import SenderCase
from lab.sender.labsender import SENDER_HOST, SENDER_NAME, VIRTUAL_TIMEOUT
from lab.sender.receivers import Staged, middleboxes, receiver_factory
from lab.sender.seam import MAIL_FROM, Delivery
from lab.smtp.transcript import Kind, note
from lab.tls.certs import CertKey, LabCA
from lab.tls.keylog import KeyLog


def destination_tls(policy: DeliveryTLS) -> DestinationTLS:
    found = parse_destination_tls(str(policy))
    assert found is not None  # every DeliveryTLS value is one of the spellings
    return found


@dataclass(frozen=True)
class ApplianceSender:
    """``--sender appliance:POLICY``: the appliance's delivery engine with the receiver as the domain's one MX."""

    policy: DeliveryTLS

    @property
    def name(self) -> str:
        return "appliance"

    @property
    def address(self) -> str:
        return "appliance delivery engine"

    @property
    def carrier(self) -> str:
        return "memory"

    def deliver(self, cases: Sequence[SenderCase], ca: LabCA) -> list[Delivery]:
        client_cert = ca.issue("appliance-sender", [SENDER_NAME], client=True)  # for a receiver that asks
        with tempfile.TemporaryDirectory(prefix="smtplab-appliance-") as tmp:
            return [self._one(case, index, ca, client_cert, Path(tmp) / str(index)) for index, case in enumerate(cases)]

    def _one(self, case: SenderCase, index: int, ca: LabCA, client_cert: CertKey, state_dir: Path) -> Delivery:
        capture, keylog = Capture(), KeyLog()
        net = open_carrier("memory", capture=capture)
        factory = receiver_factory(case, ca, clock=net.clock, keylog=keylog)
        ip = f"10.77.0.{index + 1}"
        net.listen(ip, 25, factory)
        boxes = middleboxes(case)
        staged = Staged(case, factory, capture, keylog, ip, 25, boxes)
        data = (
            f"From: <{MAIL_FROM}>\r\nTo: <{case.recipient}>\r\nSubject: smtplab receiver case {case.id}\r\n\r\n"
            f"{case.marker}\r\n"
        ).encode("ascii")
        begin = net.clock.seconds()
        try:
            result = net.run_until(
                deliver_one(
                    carrier=net,
                    receiver_ip=ip,
                    setting=destination_tls(self.policy),
                    state_dir=state_dir,
                    domain=case.domain,
                    mx_host=case.hostname,
                    sender=MAIL_FROM,
                    recipients=(case.recipient,),
                    data=data,
                    trust_pems=(ca.ca_pem,),
                    hostname=SENDER_NAME,
                    source_ip=SENDER_HOST,
                    middleboxes=boxes,
                    client_cert=client_cert,
                    keylog=keylog.callback,
                ),
                timeout=VIRTUAL_TIMEOUT,
            )
            net.drain()
        except HarnessError as exc:
            return Delivery(staged, error=str(exc), seconds=net.clock.seconds() - begin)
        finally:
            net.run_until(net.close(abort=False), timeout=10)
        entries = [entry for dcid in sorted(result.entries) for entry in result.entries[dcid]]
        entries += [note(f"mail log: {line}", Kind.MAILLOG) for line in result.log]
        entries += [note(f"middlebox: {text}", Kind.MIDDLEBOX) for text in staged.box_notes()]
        outcome = None if result.state == "delivered" else result.state
        return Delivery(staged, sender_outcome=outcome, entries=entries, seconds=net.clock.seconds() - begin)
