"""A client that does not read cannot grow the server: producer/consumer flow control on every carrier."""

from __future__ import annotations

import dataclasses
import socket
import time
from pathlib import Path

from labruntime import lab_runtime
from serving import serve
from twisted.internet import defer, protocol, task

from lab.appliance.config import quick_appliance
from lab.net.memory import MemoryNetwork
from lab.policy.modes import TLSMode
from lab.smtp.listener import FEED_SLICE, ListenerProtocol

EHLO = b"EHLO flood.example\r\n"


def vm_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def flood_unread(host: str, port: int, total: int, stall: float = 2.0, limit: float = 30.0) -> int:
    """Write up to ``total`` bytes of pipelined EHLOs and never read; stop when the server stops taking them."""
    sock = socket.create_connection((host, port), timeout=5)
    sock.setblocking(False)
    chunk = EHLO * 4096
    sent, progress, start = 0, time.monotonic(), time.monotonic()
    try:
        while sent < total and time.monotonic() - progress < stall and time.monotonic() - start < limit:
            try:
                sent += sock.send(chunk)
                progress = time.monotonic()
            except BlockingIOError:
                time.sleep(0.01)
    finally:
        sock.close()
    return sent


def test_an_unread_pipeline_does_not_grow_the_server(tmp_path: Path) -> None:
    with serve(tmp_path / "run", "--tls", "preferred") as server:
        pid = server.process.pid
        before = vm_rss_mb(pid)
        sent = flood_unread(server.host, server.port, 40_000_000)
        after = vm_rss_mb(pid)
        assert sent < 40_000_000  # the server stopped reading: the client could not write it all
        assert after - before < 20, f"RSS grew from {before:.1f} MB to {after:.1f} MB"
        # and the server still serves
        with socket.create_connection((server.host, server.port), timeout=10) as sock:
            assert sock.recv(200).startswith(b"220 ")
            sock.sendall(b"QUIT\r\n")
            assert b"221" in sock.recv(200)


# --- the same contract on the memory carrier ------------------------------------------------------------------


def settle(net: MemoryNetwork, seconds: float = 1.0) -> None:
    """Run what falls due within ``seconds`` of virtual time, calls scheduled meanwhile included."""
    until = net.clock.seconds() + seconds
    while True:
        due = [call.getTime() for call in net.clock.getDelayedCalls()]
        if not due or min(due) > until:
            net.clock.advance(until - net.clock.seconds())
            return
        net.clock.advance(max(0.0, min(due) - net.clock.seconds()))


class Reader(protocol.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: object = None) -> None:
        self.done.callback(None)


def _memory_listener(tmp_path: Path) -> tuple[MemoryNetwork, list[ListenerProtocol]]:
    clock = task.Clock()
    net = MemoryNetwork(clock)
    appliance = quick_appliance("192.168.2.1", 25, TLSMode.PREFERRED)
    runtime = lab_runtime(appliance, clock, tmp_path)
    factory = runtime.factory(appliance.listeners[0])
    built: list[ListenerProtocol] = []
    build = factory.buildProtocol

    def recording(addr: object) -> ListenerProtocol:
        built.append(build(addr))
        return built[-1]

    factory.buildProtocol = recording  # type: ignore[method-assign]
    net.listen("192.168.2.1", 25, factory)
    return net, built


def test_a_paused_listener_answers_at_most_a_slice_and_holds_the_rest(tmp_path: Path) -> None:
    net, built = _memory_listener(tmp_path)
    client = Reader()
    net.run_until(net.connect("198.51.100.7", "192.168.2.1", 25, protocol.ClientFactory.forProtocol(lambda: client)))
    settle(net)
    server = built[0]
    server.pauseProducing()  # what a transport does when its unsent output is over its bound
    flood = EHLO * 5000  # 100 kB: 5000 replies if all were answered
    client.transport.write(flood)
    settle(net)
    assert client.data.count(b"250 HELP") == 0  # paused: nothing was given to the session
    # the memory wire cannot stop: its transport keeps what arrives below the paused listener
    assert sum(map(len, server.transport._unread)) == len(flood)
    server.resumeProducing()
    settle(net)
    assert client.data.count(b"250 HELP") == 5000 and server._held == b""


def test_input_that_arrives_while_output_is_full_is_fed_a_slice_at_a_time(tmp_path: Path) -> None:
    net, built = _memory_listener(tmp_path)
    client = Reader()
    net.run_until(net.connect("198.51.100.7", "192.168.2.1", 25, protocol.ClientFactory.forProtocol(lambda: client)))
    settle(net)
    server = built[0]
    written: list[bytes] = []
    write = server.transport.write

    def full_after_first(data: bytes) -> None:  # the transport's buffer fills on the first write
        written.append(data)
        write(data)
        server.pauseProducing()

    server.transport.write = full_after_first  # type: ignore[method-assign]
    flood = EHLO * 5000
    server.dataReceived(flood)  # one read of 100 kB, as a TCP transport hands it up
    replies = b"".join(written).count(b"250 HELP")
    assert replies == FEED_SLICE // len(EHLO)  # the complete lines of one slice answered, not 5000
    assert len(server._held) == len(flood) - FEED_SLICE
    server.transport.write = write  # type: ignore[method-assign]
    server.resumeProducing()
    settle(net)
    assert client.data.count(b"250 HELP") == 5000 and server._held == b""


def test_a_paused_session_transport_keeps_input_until_resumed_and_tls_takes_over_the_producer(
    tmp_path: Path,
) -> None:
    net, built = _memory_listener(tmp_path)
    client = Reader()
    net.run_until(net.connect("198.51.100.7", "192.168.2.1", 25, protocol.ClientFactory.forProtocol(lambda: client)))
    settle(net)
    banner = client.data
    assert banner.startswith(b"220 ")
    client.transport.pauseProducing()
    client.transport.write(b"EHLO a.example\r\n")
    settle(net)
    assert client.data == banner  # the reply arrived but is kept below the paused application
    client.transport.resumeProducing()
    assert b"250 HELP" in client.data
    # the listener registered itself as producer; STARTTLS moves it under the TLS layer (as Twisted's _newtls)
    server_transport = built[0].transport
    client.transport.write(b"STARTTLS\r\n")
    settle(net)
    assert server_transport.TLS and server_transport._tls._producer is not None
    assert server_transport._producer[0] is built[0]


def test_a_paused_listener_is_still_closed_by_its_deadline(tmp_path: Path) -> None:
    net, built = _memory_listener(tmp_path)
    client = Reader()
    net.run_until(net.connect("198.51.100.7", "192.168.2.1", 25, protocol.ClientFactory.forProtocol(lambda: client)))
    built[0].pauseProducing()
    client.transport.write(EHLO * 100)
    net.run_until(client.done, timeout=400)
    assert client.data.endswith(b"421 4.4.2 Idle timeout, closing connection\r\n")
    assert built[0].session is None and built[0]._held == b""  # released at close
    assert dataclasses.asdict(built[0].listener.timeouts)["idle"] == 300
