"""Raw bytes as they crossed a link, per TCP flow, with (virtual) timestamps.

Carriers record here below TLS, so a capture holds exactly what a wire tap would see; ``lab.net.pcap``
turns flows into a pcap file with synthesised TCP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Direction(StrEnum):
    C2S = "c2s"  # client to server
    S2C = "s2c"  # server to client


@dataclass(frozen=True)
class Endpoint:
    ip: str
    port: int


@dataclass
class Segment:
    time: float
    direction: Direction
    data: bytes


@dataclass
class Flow:
    """One TCP connection: who, when, and every chunk of payload in order."""

    client: Endpoint
    server: Endpoint
    opened: float
    segments: list[Segment] = field(default_factory=list)
    closed: float | None = None
    closed_by: Direction | None = None  # C2S: the client closed first
    refused: bool = False  # the server refused the connection (RST to the SYN)

    def record(self, direction: Direction, time: float, data: bytes) -> None:
        if data:
            self.segments.append(Segment(time, direction, bytes(data)))

    def close(self, by: Direction, time: float) -> None:
        if self.closed is None:
            self.closed, self.closed_by = time, by

    def payload(self, direction: Direction) -> bytes:
        return b"".join(s.data for s in self.segments if s.direction is direction)


@dataclass
class Capture:
    """All flows of one run, in the order they were opened."""

    flows: list[Flow] = field(default_factory=list)

    def open(self, client: Endpoint, server: Endpoint, time: float) -> Flow:
        flow = Flow(client, server, time)
        self.flows.append(flow)
        return flow
