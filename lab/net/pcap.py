"""Turn captured flows into a classic pcap file that tshark and Wireshark follow as real TCP streams.

Carriers record payload only (``lab.net.capture``); the TCP around it is synthesised here: handshake, data split
at the MSS with exact sequence and acknowledgement numbers, the receiver's ACKs, and the FIN exchange in the order
the connection was closed. Everything is derived from the capture and a seed, never from the clock or a random
source, so the same capture always gives the same bytes. Virtual addresses go into the file as they are: a file,
never a socket.
"""

from __future__ import annotations

import hashlib
import ipaddress
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lab.errors import BadInput, HarnessError
from lab.net.capture import Capture, Direction, Flow

MSS = 1460
WINDOW = 65535
#: The receiver acknowledges at least every this many full segments, so no more than 8 * 1460 bytes are ever
#: unacknowledged (well inside the 64 KiB window: tshark sees no "window full").
ACK_EVERY = 8
#: Virtual time 0 is 2026-01-01T00:00:00Z in the file; times at or beyond this are taken as wall-clock already.
EPOCH = 1_767_225_600
_WALL_CLOCK = 1_000_000_000
DLT_EN10MB = 1
#: The libpcap file header's snapshot length (what tcpdump and scapy write by default).
SNAPLEN = 65535
#: First client port used for flows recorded with client port 0.
EPHEMERAL = 49152

_SYN, _ACK, _PSH, _FIN, _RST = "S", "A", "P", "F", "R"
_FLAG_BITS = {"F": 0x01, "S": 0x02, "R": 0x04, "P": 0x08, "A": 0x10}
_MSS_OPTION = struct.pack("!BBH", 2, 4, MSS)


@dataclass(frozen=True)
class Frame:
    """One packet (Ethernet frame bytes) and its timestamp in microseconds since the Unix epoch."""

    usec: int
    data: bytes


def _checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


@dataclass
class _Side:
    """One end of a synthesised connection: its addresses, the next sequence number it sends, its IP id."""

    ip: str
    port: int
    mac: str
    isn: int
    nxt: int = 0
    ip_id: int = 0

    def __post_init__(self) -> None:
        self.nxt = self.isn
        self.ip_id = self.isn & 0xFFFF


def _other(direction: Direction) -> Direction:
    return Direction.S2C if direction is Direction.C2S else Direction.C2S


def mac_for(ip: str) -> str:
    """A locally administered MAC built from the address, so each virtual host keeps one MAC everywhere."""
    packed = ipaddress.ip_address(ip).packed
    tail = packed[-4:] if len(packed) == 4 else hashlib.sha256(packed).digest()[:4]
    return "02:00:" + ":".join(f"{b:02x}" for b in tail)


def isn_for(seed: int, index: int, direction: Direction) -> int:
    """An initial sequence number that depends only on the seed, the flow's index and the side."""
    digest = hashlib.sha256(f"smtplab-pcap:{seed}:{index}:{direction.value}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def _stamp(t: float) -> int:
    """Microseconds since the Unix epoch: virtual seconds are placed after ``EPOCH``."""
    usec = round(t * 1_000_000)
    return usec if t >= _WALL_CLOCK else EPOCH * 1_000_000 + usec


def _check_overrides(port_override: Mapping[int, int] | None) -> dict[int, int]:
    if not port_override:
        return {}
    out: dict[int, int] = {}
    for src, dst in port_override.items():
        for port in (src, dst):
            if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
                raise BadInput(f"port must be an integer 1-65535, got {port!r}", field="port_override")
        out[src] = dst
    return out


class _FlowWriter:
    """Synthesises the packets of one flow, keeping both sides' sequence numbers."""

    def __init__(self, flow: Flow, index: int, seed: int, overrides: dict[int, int]) -> None:
        try:
            version = {ipaddress.ip_address(flow.client.ip).version, ipaddress.ip_address(flow.server.ip).version}
        except ValueError as exc:
            raise HarnessError(f"flow {index}: not an IP address in the capture: {exc}") from exc
        if len(version) != 1:
            raise HarnessError(f"flow {index}: client {flow.client.ip} and server {flow.server.ip} mix IPv4 and IPv6")
        self.v6 = version == {6}
        self.flow = flow
        server_port = overrides.get(flow.server.port, flow.server.port)
        # A carrier that assigns no client port records 0; give each flow its own so tshark sees distinct streams.
        client_port = flow.client.port or EPHEMERAL + index % (65536 - EPHEMERAL)
        client, server = flow.client, flow.server
        self.sides = {
            Direction.C2S: _Side(client.ip, client_port, mac_for(client.ip), isn_for(seed, index, Direction.C2S)),
            Direction.S2C: _Side(server.ip, server_port, mac_for(server.ip), isn_for(seed, index, Direction.S2C)),
        }
        self.frames: list[Frame] = []
        self.usec = _stamp(flow.opened)

    def _peer(self, direction: Direction) -> _Side:
        return self.sides[_other(direction)]

    def _emit(self, direction: Direction, flags: str, payload: bytes = b"", *, ack: int | None = None) -> None:
        # Headers are packed here rather than built as scapy layers: byte for byte what scapy builds (a test
        # dissects and rebuilds every frame with scapy), at a fraction of the cost, which matters at one pcap per run.
        src, dst = self.sides[direction], self._peer(direction)
        options = _MSS_OPTION if _SYN in flags else b""
        acknowledged = (dst.nxt if ack is None else ack) if _ACK in flags else 0
        bits = sum(_FLAG_BITS[f] for f in flags)
        offset = (20 + len(options)) // 4 << 4
        header = struct.pack("!HHIIBBHHH", src.port, dst.port, src.nxt, acknowledged, offset, bits, WINDOW, 0, 0)
        segment = header + options + payload
        src_ip, dst_ip = ipaddress.ip_address(src.ip).packed, ipaddress.ip_address(dst.ip).packed
        if self.v6:
            pseudo = src_ip + dst_ip + struct.pack("!I3xB", len(segment), 6)
            net = struct.pack("!IHBB", 6 << 28, len(segment), 6, 64) + src_ip + dst_ip
            ethertype = 0x86DD
        else:
            pseudo = src_ip + dst_ip + struct.pack("!BBH", 0, 6, len(segment))
            ip_header = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(segment), src.ip_id, 0x4000, 64, 6, 0)
            ip_header += src_ip + dst_ip
            net = ip_header[:10] + struct.pack("!H", _checksum(ip_header)) + ip_header[12:]
            src.ip_id = (src.ip_id + 1) & 0xFFFF
            ethertype = 0x0800
        segment = segment[:16] + struct.pack("!H", _checksum(pseudo + segment)) + segment[18:]
        frame = _mac(dst.mac) + _mac(src.mac) + struct.pack("!H", ethertype) + net + segment
        self.frames.append(Frame(self.usec, frame))
        src.nxt = (src.nxt + len(payload) + (1 if _SYN in flags or _FIN in flags else 0)) & 0xFFFFFFFF

    def _at(self, t: float) -> None:
        """Move this flow's clock forward (never back, so packets stay in order within the flow)."""
        self.usec = max(self.usec, _stamp(t))

    def build(self) -> list[Frame]:
        c2s, s2c = Direction.C2S, Direction.S2C
        self._emit(c2s, _SYN)
        if self.flow.refused:
            if self.flow.segments:
                raise HarnessError("a refused flow carries no payload, but this capture has some")
            self._emit(s2c, _RST + _ACK)
            return self.frames
        self._emit(s2c, _SYN + _ACK)
        self._emit(c2s, _ACK)
        for segment in self.flow.segments:
            self._at(segment.time)
            self._data(segment.direction, segment.data)
        if self.flow.closed is not None:
            self._at(self.flow.closed)
            closer = self.flow.closed_by or c2s
            self._emit(closer, _FIN + _ACK)
            self._emit(_other(closer), _FIN + _ACK)
            self._emit(closer, _ACK)
        return self.frames

    def _data(self, direction: Direction, data: bytes) -> None:
        """Send ``data`` in MSS-sized PSH/ACK packets; the receiver acknowledges every ``ACK_EVERY`` and at the end."""
        chunks = [data[i : i + MSS] for i in range(0, len(data), MSS)]
        for n, chunk in enumerate(chunks, start=1):
            self._emit(direction, _PSH + _ACK, chunk)
            if n % ACK_EVERY == 0 or n == len(chunks):
                self._emit(_other(direction), _ACK)


def frames(capture: Capture, *, port_override: Mapping[int, int] | None = None, seed: int = 0) -> list[Frame]:
    """Every packet of every flow, in time order (ties keep flow order, then packet order within the flow).

    ``port_override`` maps a server port in the capture to the port written to the file, e.g. ``{2525: 25}``
    so tshark decodes SMTP without a decode-as rule.
    """
    overrides = _check_overrides(port_override)
    out: list[Frame] = []
    for index, flow in enumerate(capture.flows):
        out.extend(_FlowWriter(flow, index, seed, overrides).build())
    out.sort(key=lambda f: f.usec)  # stable: per-flow order is kept
    return out


def write_pcap(capture: Capture, path: Path, *, port_override: Mapping[int, int] | None = None, seed: int = 0) -> None:
    """Write ``capture`` as a libpcap file (Ethernet, microsecond timestamps), byte-identical for equal input.

    The classic libpcap format is two fixed records (https://wiki.wireshark.org/Development/LibpcapFileFormat):
    a 24-byte file header, then a 16-byte header before each frame; little-endian, as x86 writers produce it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    packets = frames(capture, port_override=port_override, seed=seed)
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, SNAPLEN, DLT_EN10MB)]
    for frame in packets:
        sec, usec = divmod(frame.usec, 1_000_000)
        out.append(struct.pack("<IIII", sec, usec, len(frame.data), len(frame.data)))
        out.append(frame.data)
    path.write_bytes(b"".join(out))
