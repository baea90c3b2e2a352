"""The receivers a sender is judged against: one remote MTA per receiver case, with the case's fault,
certificate and TLS settings, on its own address, its bytes recorded below TLS.

The same factory serves the lab's own client engine (memory carrier, virtual time) and an external sender (real
TCP on a loopback address per case, a relay in front when the case puts a middlebox on the path).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lab.net.capture import Capture
from lab.net.middlebox import StartTLSStripper
from lab.sender.cases import SenderCase
from lab.smtp.remote_mta import RemoteMTAFactory
from lab.tls.certs import CertKey, LabCA, self_signed
from lab.tls.keylog import KeyLog
from lab.tls.tlsctx import ServerTLS

WRONG_NAME = "wrong-name.invalid"


def receiver_certificate(case: SenderCase, ca: LabCA) -> CertKey:
    """The certificate the case's receiver presents (docs/scenario-format.md, Receiver cases)."""
    kind, host = case.receiver.certificate, case.hostname
    if kind == "self-signed":
        return self_signed(f"snd-{case.id.lower()}", [host])
    if kind == "expired":
        return ca.issue_expired(f"snd-{case.id.lower()}", [host])
    if kind == "wrong-name":
        return ca.issue("snd-wrong-name", [WRONG_NAME])
    return ca.issue(f"snd-{case.id.lower()}", [host, case.domain])


def receiver_tls(case: SenderCase, ca: LabCA, keylog: KeyLog | None = None) -> ServerTLS:
    spec = case.receiver
    return ServerTLS(
        receiver_certificate(case, ca),
        min_version=spec.min_version or "1.2",
        max_version=spec.max_version,
        ciphers=spec.ciphers,
        request_client_cert=spec.request_client_cert,
        client_ca_pems=(ca.ca_pem,) if spec.request_client_cert else (),
        keylog=keylog.callback if keylog is not None else None,
    )


def receiver_factory(case: SenderCase, ca: LabCA, clock: Any = None, keylog: KeyLog | None = None) -> RemoteMTAFactory:
    return RemoteMTAFactory(
        case.hostname,
        starttls=case.receiver.starttls,
        tls_server=receiver_tls(case, ca, keylog),
        clock=clock,
    )


def middleboxes(case: SenderCase) -> list[StartTLSStripper]:
    box = case.receiver.middlebox
    if box is None:
        return []
    return [StartTLSStripper(rewrite=box.rewrite, answer_starttls=box.answer_starttls)]


@dataclass
class Staged:
    """One case's receiver as staged for a run: where a sender reaches it, and what it saw."""

    case: SenderCase
    factory: RemoteMTAFactory
    capture: Capture
    keylog: KeyLog
    host: str  # where the sender connects (a relay's address when a middlebox stands in front)
    port: int
    boxes: list[StartTLSStripper] = field(default_factory=list)

    def box_notes(self) -> list[str]:
        return [note for box in self.boxes for note in box.notes]
