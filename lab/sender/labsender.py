"""The ``lab`` sender kind: the lab's own client engine as a sender, in memory on virtual time.

Each destination control maps to one of the engine's client behaviours (docs/rules.md §4), so the lab's model of
a correct sender is held against the same receiver cases as any other sender.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.protocol import ClientFactory

from lab.errors import HarnessError
from lab.net.capture import Capture
from lab.net.carrier import open_carrier
from lab.policy.modes import DeliveryTLS
from lab.sender.cases import SenderCase
from lab.sender.receivers import Staged, middleboxes, receiver_factory
from lab.sender.seam import MAIL_FROM, Delivery
from lab.smtp.behaviours import behaviour_steps
from lab.smtp.client import ScriptedClient
from lab.smtp.transcript import Kind, note
from lab.tls.certs import LabCA
from lab.tls.keylog import KeyLog
from lab.tls.tlsctx import ClientCerts, ClientTLSFactory

#: The client behaviour that implements each destination control.
BEHAVIOURS: dict[DeliveryTLS, str] = {
    DeliveryTLS.NO: "skip",
    DeliveryTLS.PREFERRED: "prefer",
    DeliveryTLS.REQUIRED: "require",
    DeliveryTLS.PREFERRED_VERIFY: "prefer",  # checks the certificate, delivers whatever it found (§6.4)
    DeliveryTLS.REQUIRED_VERIFY: "require-verify",
}
VIRTUAL_TIMEOUT = 900.0  # virtual seconds one case may take (the engine's own reply timeout ends stalls first)
SENDER_HOST = "10.77.1.1"
SENDER_NAME = "sender.lab.test"
REPLY_TIMEOUT = 30.0


@dataclass(frozen=True)
class LabSender:
    """``--sender lab:POLICY``."""

    policy: DeliveryTLS

    @property
    def name(self) -> str:
        return "lab"

    @property
    def address(self) -> str:
        return "lab client engine"

    @property
    def carrier(self) -> str:
        return "memory"

    def deliver(self, cases: Sequence[SenderCase], ca: LabCA) -> list[Delivery]:
        return [self._one(case, index, ca) for index, case in enumerate(cases)]

    def _one(self, case: SenderCase, index: int, ca: LabCA) -> Delivery:
        capture, keylog = Capture(), KeyLog()
        net = open_carrier("memory", capture=capture)
        factory = receiver_factory(case, ca, clock=net.clock, keylog=keylog)
        ip = f"10.77.0.{index + 1}"
        net.listen(ip, 25, factory)
        boxes = middleboxes(case)
        staged = Staged(case, factory, capture, keylog, ip, 25, boxes)
        steps = behaviour_steps(
            BEHAVIOURS[self.policy],
            ehlo=SENDER_NAME,
            mail_from=MAIL_FROM,
            rcpt_to=(case.recipient,),
            body_marker=case.marker,
        )
        tls = ClientTLSFactory(
            server_name=case.hostname,
            trust_pems=(ca.ca_pem,),
            certs=ClientCerts(ca.ca_dir.parent, SENDER_NAME),
            keylog=keylog.callback,
        )

        def connect(f: ClientFactory) -> Any:
            return net.connect(SENDER_HOST, ip, 25, f, middleboxes=boxes)

        client = ScriptedClient(
            steps, clock=net.clock, connect=connect, tls_factory=tls, target=f"{ip}:25", reply_timeout=REPLY_TIMEOUT
        )
        begin = net.clock.seconds()
        try:
            record = net.run_until(client.run(), timeout=VIRTUAL_TIMEOUT)
            net.drain()
        except HarnessError as exc:
            return Delivery(staged, error=str(exc), seconds=net.clock.seconds() - begin)
        finally:
            net.run_until(net.close(abort=False), timeout=10)
        notes = [note(f"middlebox: {text}", Kind.MIDDLEBOX) for text in staged.box_notes()]
        return Delivery(staged, entries=[*record.entries, *notes], seconds=net.clock.seconds() - begin)
