"""The same listener over the in-memory carrier: virtual addresses reach the HAT, TLS is real, time is virtual."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from labruntime import lab_runtime
from twisted.internet import defer, protocol, task

from lab.appliance.config import quick_appliance
from lab.net.capture import Capture, Direction
from lab.net.memory import MemoryNetwork
from lab.policy.hat import HostAccessTable, SenderGroup
from lab.policy.modes import TLSMode
from lab.smtp.listener import ApplianceRuntime
from lab.tls.tlsctx import ClientTLS


class Dialogue(protocol.Protocol):
    """Sends one line per reply it receives; starts TLS after the reply to STARTTLS."""

    def __init__(self, lines: list[bytes]) -> None:
        self.lines = list(lines)
        self.replies: list[bytes] = []
        self.buffer = b""
        self.done: defer.Deferred[list[bytes]] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            if line[3:4] == b"-":
                continue
            self.replies.append(line)
            if self.replies[-1].startswith(b"220 2.0.0"):
                self.transport.startTLS(ClientTLS())
            if self.lines:
                self.transport.write(self.lines.pop(0) + b"\r\n")

    def connectionLost(self, reason: object = None) -> None:
        self.done.callback(self.replies)


def _lab(tmp_path: Path, tls: TLSMode) -> tuple[MemoryNetwork, ApplianceRuntime, Capture]:
    clock, capture = task.Clock(), Capture()
    net = MemoryNetwork(clock, capture)
    appliance = quick_appliance("192.168.2.1", 25, tls)
    listener = appliance.listeners[0]
    hat = HostAccessTable((SenderGroup.of("BLACKLIST", ["203.0.113.66"], "BLOCKED"), *listener.hat.groups))
    appliance = dataclasses.replace(appliance, listeners=(dataclasses.replace(listener, hat=hat),))
    runtime = lab_runtime(
        appliance,
        clock,
        tmp_path,
        reverse_dns=lambda ip: ("mx.example.net", True) if ip == "198.51.100.7" else (None, False),
    )
    net.listen("192.168.2.1", 25, runtime.factory(appliance.listeners[0]))
    return net, runtime, capture


def _talk(net: MemoryNetwork, source: str, lines: list[bytes]) -> list[bytes]:
    client = Dialogue(lines)
    factory = protocol.ClientFactory.forProtocol(lambda: client)
    net.connect(source, "192.168.2.1", 25, factory)
    return net.run_until(client.done, timeout=60)


def test_required_over_memory_with_real_tls(tmp_path: Path) -> None:
    net, runtime, capture = _lab(tmp_path, TLSMode.REQUIRED)
    replies = _talk(
        net,
        "198.51.100.7",
        [
            b"EHLO mx.example.net",
            b"MAIL FROM:<a@example.net>",
            b"STARTTLS",
            b"EHLO mx.example.net",
            b"MAIL FROM:<a@example.net>",
            b"RCPT TO:<bob@example.com>",
            b"DATA",
            b"hi\r\n.",
            b"QUIT",
        ],
    )
    assert [r[:3] for r in replies] == [b"220", b"250", b"530", b"220", b"250", b"250", b"250", b"354", b"250", b"221"]
    log = runtime.maillog.lines
    assert any("address 198.51.100.7 reverse dns host mx.example.net verified yes" in line for line in log)
    assert any("TLS success protocol TLSv1.3" in line for line in log)
    [flow] = capture.flows
    wire = flow.payload(Direction.C2S)
    assert b"STARTTLS\r\n" in wire and b"RCPT TO" not in wire  # the envelope travelled encrypted
    assert flow.client.ip == "198.51.100.7" and flow.server.ip == "192.168.2.1"
    assert len(runtime.spool.for_listener("Inboundmail").messages()) == 1
    assert net.clock.seconds() < 1.0  # virtual time: a few latency steps, no wall-clock sleeps


def test_hat_sees_virtual_addresses(tmp_path: Path) -> None:
    net, runtime, _ = _lab(tmp_path, TLSMode.PREFERRED)
    assert _talk(net, "203.0.113.66", [b"EHLO x", b"QUIT"])[0].startswith(b"554 ")
    assert any("REJECT SG BLACKLIST match 203.0.113.66" in line for line in runtime.maillog.lines)


def test_same_run_same_plaintext_bytes(tmp_path: Path) -> None:
    runs = []
    for i in range(2):
        net, _, capture = _lab(tmp_path / str(i), TLSMode.NO)
        _talk(net, "198.51.100.7", [b"EHLO x", b"MAIL FROM:<a@example.net>", b"QUIT"])
        runs.append([(s.time, s.direction, s.data) for s in capture.flows[0].segments])
    assert runs[0] == runs[1]
