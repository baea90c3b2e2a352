"""What one client run saw, and the only code that writes it: typed observations, connections, transcript.

The step interpreter says what happened (``replied``, ``greeted``, ``tls_up``, ``delivered`` ...); ``Recorder``
turns that into ``Observations`` fields, including the labels of ``replies`` (the verb, ``VERB/tls`` inside TLS,
``#2`` for repeats, a step's own ``as:`` label, a ``mail`` step's label as prefix).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lab.scenario.observations import Observations
from lab.smtp.transcript import Entry, Transcript


@dataclass
class ConnectionInfo:
    """One TCP connection the client opened, with virtual times."""

    number: int
    client: tuple[str, int] | None
    server: tuple[str, int] | None
    opened: float
    closed: float | None = None
    closed_by: str | None = None  # client | server
    tls: bool = False


@dataclass
class ClientRecord:
    """What one run of the client saw: the transcript entries, the observations, the connections."""

    entries: list[Entry]
    observed: Observations
    connections: list[ConnectionInfo] = field(default_factory=list)

    @property
    def transcript(self) -> list[str]:
        """The swaks-style text view of the entries."""
        return [entry.line for entry in self.entries]

    @property
    def times(self) -> list[float | None]:
        return [entry.time for entry in self.entries]


class Recorder:
    """The client's observations, written field by field as the interpreter reports events."""

    def __init__(self) -> None:
        self.obs = Observations.for_client()
        self.connections: list[ConnectionInfo] = []

    def record(self, transcript: Transcript) -> ClientRecord:
        return ClientRecord(list(transcript.entries), self.obs, self.connections)

    def opened(self, info: ConnectionInfo) -> None:
        self.connections.append(info)
        self.obs.connections = info.number

    def greeted(self, code: int) -> None:
        if not self.obs.connected:
            self.obs.connected = True
            self.obs.banner = code

    def ehlo_seen(self, advertised: bool) -> None:
        if self.obs.starttls_advertised is None:
            self.obs.starttls_advertised = advertised

    def starttls_replied(self, code: int) -> None:
        if self.obs.starttls_reply is None:
            self.obs.starttls_reply = code

    def tls_up(self, version: str, cipher: str, verified: bool | None) -> None:
        if not self.obs.tls:
            self.obs.tls, self.obs.tls_version, self.obs.tls_cipher = True, version, cipher
            if verified is not None:
                self.obs.server_cert_verified = verified

    def tls_failed(self, reason: str) -> None:
        if self.obs.tls_error is None:
            self.obs.tls_error = reason

    def delivered(self, *, tls: bool) -> None:
        self.obs.delivered = True
        if tls:
            self.obs.delivered_tls = True
        else:
            self.obs.delivered_plaintext = True

    def aborted(self) -> None:
        self.obs.aborted = True

    def may_fall_back(self) -> None:
        if self.obs.fell_back is None:
            self.obs.fell_back = False

    def fell_back(self) -> None:
        self.obs.fell_back = True

    def injection_executed(self) -> None:
        self.obs.injection_executed = True

    def injection_settled(self) -> None:
        """The wait for injected replies inside TLS ended: none came unless already seen."""
        if self.obs.injection_executed is None:
            self.obs.injection_executed = False

    def response_injection(self, discarded: bool) -> None:
        self.obs.response_injection_discarded = bool(discarded or self.obs.response_injection_discarded)

    def closed(self) -> None:
        if self.connections:
            self.obs.closed_by = self.connections[-1].closed_by or "client"

    # -- replies by label

    def label(self, default: str, own: str | None, *, tls: bool, prefix: str = "") -> str:
        """A free label for a reply: ``own`` (a step's ``as:``) unless a prefix applies, else the default."""
        replies = self._replies()
        base = own if own and not prefix else prefix + default + ("/tls" if tls else "")
        label, n = base, 1
        while label in replies:
            n += 1
            label = f"{base}#{n}"
        return label

    def replied(self, default: str, own: str | None, code: int, *, tls: bool, prefix: str = "") -> None:
        self._replies()[self.label(default, own, tls=tls, prefix=prefix)] = code

    def relabel_last(self, name: str, prefix: str, *, tls: bool) -> None:
        """The reply just recorded under its verb belongs to a labelled ``mail`` step: prefix its label."""
        if not prefix:
            return
        replies = self._replies()
        code = replies.pop(next(reversed(replies)))
        replies[self.label(name, None, tls=tls, prefix=prefix)] = code

    def _replies(self) -> dict[str, int]:
        if self.obs.replies is None:
            self.obs.replies = {}
        return self.obs.replies
