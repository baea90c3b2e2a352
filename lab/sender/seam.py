"""The seam between the judging harness and a sender under test.

A sender kind stages the receivers of the cases it is given (``lab.sender.receivers``), makes the sender deliver
one message per case, waits (bounded) for what became of each, and hands back one ``Delivery`` per case. It
judges nothing: ``lab.sender.run`` reads every verdict from the receivers' record and capture. Kinds: ``lab``
(the lab's own client engine, ``lab.sender.labsender``) and ``external`` (``lab.sender.external``); the
appliance's own outbound delivery can be a third without a change here or in the runner.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from lab.policy.modes import DeliveryTLS
from lab.sender.cases import SenderCase
from lab.sender.receivers import Staged
from lab.smtp.transcript import Entry
from lab.tls.certs import LabCA

#: The envelope sender of every message the harness has a sender deliver.
MAIL_FROM = "sender-probe@smtplab.test"


@dataclass
class Delivery:
    """What one case's run gave: the staged receiver (its record and capture), what the sender itself said of
    the message (``deferred`` / ``bounced`` from its log or queue, else None), transcript entries, seconds taken,
    and, when the harness could not decide anything, why (an ERROR, never a FAILED)."""

    staged: Staged
    sender_outcome: str | None = None
    entries: list[Entry] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None


class ISender(Protocol):
    """A sender under test, as ``smtplab run --sender`` names it."""

    @property
    def name(self) -> str: ...  # how reports name it
    @property
    def address(self) -> str: ...  # where it is, for the record (``lab``, ``postfix -c DIR`` ...)
    @property
    def policy(self) -> DeliveryTLS: ...  # the destination control it is declared to apply
    @property
    def carrier(self) -> str: ...  # memory (virtual time) or tcp

    def deliver(self, cases: Sequence[SenderCase], ca: LabCA) -> list[Delivery]:
        """One message per case to that case's receiver; one ``Delivery`` per case, in order. A sender that cannot
        be started raises ``lab.errors.HarnessError`` (every case is then an ERROR with that reason)."""
        ...
